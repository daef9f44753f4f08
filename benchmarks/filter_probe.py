"""Research probe (issue 22): why do interpretable filters collapse, and what fixes it?

Frozen ImageNet EfficientNet-Lite0 stem, its outputs cached once (and for flipped images);
trains the top conv-layer (lr 1e-3), the new 3x3 layer and the norm head (lr 1e-2) of both twins
exactly as the CUB recipe does, then measures accuracy, location instability with both references
and the collapse figures on a validation split carved from the training images (or on the test
split once settings are chosen).

  python benchmarks/filter_probe.py --setting cub --eval val --loss '{"lambda_":0.6,"z_estimate":"batch"}'
  python benchmarks/filter_probe.py --loss '{"lambda_":0.6,"z_estimate":"batch","mode":"posterior"}' --div-post 1000 --decor 1000

Its --div-post W and --decor W set the product's FilterLoss diversity and decorrelation at W / C
(C = 1280 filters: the product scales the terms by C), on every layer carrying the loss (session 8's
runs applied the probe's own copies of the two terms to the new layer only).
The runs of docs/filter_loss.md were made with this script; the product's own runs
(icnn train --train-split fit --eval-split val) confirm the chosen one.
"""
import argparse, json, os, time, hashlib, zlib
import torch, torch.nn.functional as F
from icnn.models.registry import build_model
from icnn.data.cub import CUB200
from icnn.data.negatives import NegativeImages
from icnn.loss import FilterLoss
from icnn.metrics.instability import LocationInstability, landmark_distances
from icnn.metrics.collapse import FilterCollapse
from icnn.metrics.receptive_field import layer_geometry, unit_centers

ap = argparse.ArgumentParser()
ap.add_argument("--setting", default="cub", choices=["cub", "transfer"])
ap.add_argument("--eval", default="val", choices=["val", "test"])
ap.add_argument("--variant", default="interp", help="ordinary | interp")
ap.add_argument("--loss", default='{"lambda_":0.6,"z_estimate":"batch"}')
ap.add_argument("--layers", default="top,new")
ap.add_argument("--epochs", type=int, default=6)
ap.add_argument("--bs", type=int, default=32)
ap.add_argument("--lr", type=float, default=0.01)
ap.add_argument("--top-lr", type=float, default=0.001)
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--nneg", type=int, default=300)
ap.add_argument("--size", type=int, default=224)
ap.add_argument("--mask", default="{}")
ap.add_argument("--top-mask", type=int, default=1, help="0: the top layer keeps no mask")
ap.add_argument("--data", default="../shared/data")
ap.add_argument("--cache", default=".cache/filter_probe")
ap.add_argument("--tag", default="")
ap.add_argument("--pairs", type=int, default=0, help="1: each batch holds images with their flips; the part location of a filter is inferred from both views")
ap.add_argument("--parts", type=int, default=0, help="k > 0: part targets from a k-factor NMF of the initial top-layer features")
ap.add_argument("--parts-ratio", type=float, default=2.5, help="a factor is an object part when its peak on the category is this many times its peak on negatives")
ap.add_argument("--parts-radius", type=int, default=0, help="a filter's target: its argmax within this many units (Chebyshev) of its part's location")
ap.add_argument("--parts-layers", default="new", help="layers whose targets are the parts")
ap.add_argument("--save", default="", help="write the trained model's state dict here (for analysis)")
ap.add_argument("--new-lr", type=float, default=None, help="lr of the new layer (default --lr)")
ap.add_argument("--div", type=float, default=0.0, help="weight of the filter-diversity term")
ap.add_argument("--div-layers", default="new", help="layers of --div")
ap.add_argument("--div-post", type=float, default=0.0, help="weight of the posterior-collision term across filters")
ap.add_argument("--decor", type=float, default=0.0, help="weight of the decorrelation of the filters' peak scores over the category's images")
ap.add_argument("--groups", type=int, default=1, help="groups of the new 3x3 conv-layer (1: the paper's dense layer; 1280: depthwise)")
ap.add_argument("--init", default="kaiming", help="kaiming (the paper: fresh) | identity: the new layer starts passing its input through")
args = ap.parse_args()
torch.set_num_threads(int(os.environ.get("NT", "2")))
ROOT = os.path.join(args.data, "cub200-subset/CUB_200_2011"); NEG = os.path.join(args.data, "negatives")
os.makedirs(args.cache, exist_ok=True)


def is_val(key):  # the validation rule: 20% of the training images by SHA-1 of their file name
    return int(hashlib.sha1(os.path.basename(key).encode()).hexdigest()[:8], 16) / 2**32 < 0.2


def subsets():
    """(train, eval) lists of (dataset, index) for the setting."""
    tr = CUB200(ROOT, split="train", labels="species", image_size=args.size)
    te = CUB200(ROOT, split="test", labels="species", image_size=args.size)
    al = CUB200(ROOT, split=None, labels="species", image_size=args.size)
    ntr = NegativeImages(NEG, split="train", landmark_names=tr.landmark_names, image_size=args.size)
    nte = NegativeImages(NEG, split="test", landmark_names=tr.landmark_names, image_size=args.size)
    rng = torch.Generator().manual_seed(0)
    neg_tr = sorted(torch.randperm(len(ntr), generator=rng)[: args.nneg].tolist())
    if args.setting == "cub":
        pos_tr = list(range(len(tr.records)))
        pos_te = [(te, i) for i in range(len(te.records))]
    else:  # species 1-5 train; val: 6-10's training images; test: 6-10 every image (never seen)
        pos_tr = [i for i, r in enumerate(tr.records) if r.label < 5]
        pos_te = [(al, i) for i, r in enumerate(al.records) if r.label >= 5]
    ptr = [(tr, i) for i in pos_tr]
    ntr_l = [(ntr, i) for i in neg_tr]
    fit = [p for p in ptr if not is_val(str(p[0].records[p[1]].path))], [n for n in ntr_l if not is_val(str(n[0].records[n[1]].path))]
    val = [p for p in ptr if is_val(str(p[0].records[p[1]].path))], [n for n in ntr_l if is_val(str(n[0].records[n[1]].path))]
    if args.setting == "transfer":  # held-out species for validation: species 6-10's training images, never the test split
        fit = ptr, fit[1]
        val = [(tr, i) for i, r in enumerate(tr.records) if r.label >= 5], val[1]
    test = pos_te, [(nte, i) for i in range(len(nte.records))]
    return fit, val, test


@torch.no_grad()
def features(name, pos, neg, flips):
    p = os.path.join(args.cache, f"{args.setting}_{name}_{args.size}_{args.nneg}.pt")
    if os.path.exists(p):
        return torch.load(p)
    m = build_model("efficientnet_lite0", num_classes=1, interpretable=False, weights="imagenet", image_size=args.size).eval()
    items = [(d, i, 1) for d, i in pos] + [(d, i, 0) for d, i in neg]
    xs, xf, ys, lms = [], [], [], []
    for s in range(0, len(items), 32):
        batch = [items[j][0][items[j][1]] for j in range(s, min(s + 32, len(items)))]
        im = torch.stack([b["image"] for b in batch])
        xs.append(m.stem(m.normalize(im)).half())
        if flips:
            xf.append(m.stem(m.normalize(im.flip(-1))).half())
        ys += [items[j][2] for j in range(s, min(s + 32, len(items)))]
        lm = torch.stack([b["landmarks"] for b in batch])
        lm[[k for k, j in enumerate(range(s, min(s + 32, len(items)))) if items[j][2] == 0]] = float("nan")
        lms.append(lm)
    d = {"x": torch.cat(xs), "y": torch.tensor(ys), "lm": torch.cat(lms)}
    if flips:
        d["xf"] = torch.cat(xf)
    torch.save(d, p)
    return d


t0 = time.time()
fit, val, test = subsets()
tr = features("fit", *fit, flips=True)
ev = features("val", *val, flips=False) if args.eval == "val" else features("test", *test, flips=False)
print(f"data: fit {len(tr['y'])} ({int(tr['y'].sum())} pos), eval[{args.eval}] {len(ev['y'])} ({int(ev['y'].sum())} pos) {time.time()-t0:.0f}s", flush=True)


def build(interp):
    torch.manual_seed(args.seed)
    m = build_model("efficientnet_lite0", num_classes=1, interpretable=interp, weights="imagenet", image_size=args.size,
                    head_norm=True, mask=json.loads(args.mask))
    if interp and not args.top_mask:
        m.layers["top"].mask = None
    if args.groups > 1:
        old = m.layers["new"].body.conv
        conv = torch.nn.Conv2d(old.in_channels, old.out_channels, 3, padding=1, groups=args.groups)
        torch.nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        torch.nn.init.zeros_(conv.bias)
        m.layers["new"].body.conv = conv
    if args.init == "identity":  # each new filter starts as the top filter of the same index
        conv = m.layers["new"].body.conv
        with torch.no_grad():
            conv.weight.zero_()
            conv.weight[torch.arange(conv.out_channels), torch.arange(conv.out_channels) % conv.weight.shape[1], 1, 1] = 1.0
            conv.bias.zero_()
    return m


def run_layers(m, x):
    relu, masked = {}, {}
    h = x
    for name, L in m.layers.items():
        relu[name], masked[name] = L(h)
        h = masked[name]
    return relu, masked, m.head(h)


interp = args.variant != "ordinary"
m = build(interp)
cfg = json.loads(args.loss)
if args.div_post:  # the product's terms, on every layer carrying the loss
    cfg["diversity"] = args.div_post / 1280
if args.decor:
    cfg["decorrelation"] = args.decor / 1280
fls = {}
if interp:
    for name in args.layers.split(","):
        c, h, w = 1280, 7 * args.size // 224, 7 * args.size // 224
        fls[name] = FilterLoss(c, 2, (h, w), negative_class=0, **cfg)
for p in m.stem.parameters():
    p.requires_grad_(False)
top_p = list(m.layers["top"].parameters())
new_p = list(m.layers["new"].parameters())
rest = [p for n, p in m.named_parameters() if not n.startswith("layers.") and not n.startswith("stem")]
opt = torch.optim.SGD([{"params": top_p, "lr": args.top_lr}, {"params": new_p, "lr": args.new_lr or args.lr}, {"params": rest, "lr": args.lr}], momentum=0.9, weight_decay=5e-4)


def diversity(x, y):
    """mean over category images of ||mean_f x_f / ||x_f|| ||^2 (1: all filters alike; 1/C: orthogonal)."""
    x = x[y == 1]
    if len(x) == 0:
        return torch.zeros(())
    v = x.flatten(2)
    v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    return v.mean(1).pow(2).sum(-1).mean()
def nmf(X, k, iters=300):  # X (n, C) >= 0 ~ H (n, k) W (k, C), multiplicative updates
    gg = torch.Generator().manual_seed(0)
    W = torch.rand(k, X.shape[1], generator=gg) + 0.1; H = torch.rand(X.shape[0], k, generator=gg) + 0.1
    for _ in range(iters):
        H *= (X @ W.t()) / (H @ (W @ W.t()) + 1e-9)
        W *= (H.t() @ X) / ((H.t() @ H) @ W + 1e-9)
    return H, W


def project(X, W, iters=100):  # nonnegative H with X ~ H W, W fixed
    H = torch.full((X.shape[0], W.shape[0]), 0.5)
    WWt = W @ W.t(); XWt = X @ W.t()
    for _ in range(iters):
        H *= XWt / (H @ WWt + 1e-9)
    return H


PARTS = None
if args.parts:
    m.eval()
    with torch.no_grad():
        Ft = torch.cat([run_layers(m, tr[v][s:s + 64].float())[0]["top"] for v in ("x", "xf") for s in range(0, len(tr["y"]), 64)])
        yy = torch.cat([tr["y"], tr["y"]]); Cc = Ft.shape[1]
        X = Ft.permute(0, 2, 3, 1).reshape(len(Ft), -1, Cc)
        Hh, Wp = nmf(X.reshape(-1, Cc), args.parts)
        Hh = Hh.reshape(len(Ft), -1, args.parts)
        ratio = Hh[yy == 1].amax(1).mean(0) / Hh[yy == 0].amax(1).mean(0).clamp_min(1e-9)
        obj = ratio.argsort(descending=True)[: int((ratio >= args.parts_ratio).sum().clamp_min(1))]
        PARTS = {"W": Wp, "obj": obj}
        print("parts: factor ratios", [round(v, 2) for v in ratio.sort(descending=True).values.tolist()], "object parts", len(obj), flush=True)
    m.train()


def part_units(relu, layer_maps):
    """(B, C) target units: each filter's argmax within parts_radius of its part's location."""
    Cc = relu["top"].shape[1]; b, c, hh_, ww_ = layer_maps.shape
    H = project(relu["top"].detach().permute(0, 2, 3, 1).reshape(-1, Cc), PARTS["W"]).reshape(b, hh_ * ww_, -1)
    anchor = H[:, :, PARTS["obj"]].argmax(1)  # (B, n_obj)
    a = anchor[:, torch.arange(c) % len(PARTS["obj"])]  # (B, C)
    r = args.parts_radius
    if r == 0:
        return a
    uu = torch.arange(hh_ * ww_)
    near = ((uu // ww_)[None, None] - (a // ww_)[..., None]).abs().le(r) & ((uu % ww_)[None, None] - (a % ww_)[..., None]).abs().le(r)
    return torch.where(near, layer_maps.detach().flatten(2), torch.full((), -1.0)).argmax(-1)


sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs)
n = len(tr["y"])
g = torch.Generator().manual_seed(args.seed)
m.train()
for ep in range(1, args.epochs + 1):
    for f in fls.values():
        f.start_epoch(ep)
    perm = torch.randperm(n, generator=g)
    tot = {"task": 0.0, "f": 0.0, "acc": 0.0}; nb = 0
    for i in range(0, (2 if args.pairs else 1) * n - args.bs + 1, args.bs):
        if args.pairs:
            idx = perm[i // 2:i // 2 + args.bs // 2]
            x = torch.cat((tr["x"][idx], tr["xf"][idx])).float(); y = torch.cat((tr["y"][idx], tr["y"][idx]))
        else:
            idx = perm[i:i + args.bs]
            flip = torch.rand(len(idx), generator=g) < 0.5
            x = torch.where(flip[:, None, None, None], tr["xf"][idx], tr["x"][idx]).float(); y = tr["y"][idx]
        relu, masked, logit = run_layers(m, x)
        logit = logit.squeeze(1)
        loss = F.softplus(-(2 * y.float() - 1) * logit).mean()
        units = {}
        if args.pairs:  # the consensus of the two views: argmax of x(I) + mirror(x(flip I))
            for k in fls:
                r = relu[k].detach(); hb = r.shape[0] // 2; W_ = r.shape[-1]
                u0 = (r[:hb] + r[hb:].flip(-1)).flatten(2).argmax(-1)
                units[k] = torch.cat((u0, (u0 // W_) * W_ + (W_ - 1 - u0 % W_)))
        if PARTS is not None:
            for k in args.parts_layers.split(","):
                units[k] = part_units(relu, relu[k])
        fl = sum((fls[k](relu[k], y, units.get(k)) for k in fls), torch.zeros(()))
        if args.div:
            fl = fl + args.div * sum(diversity(relu[k], y) for k in args.div_layers.split(","))
        if not torch.isfinite(loss + fl):
            raise SystemExit(f"non-finite at ep {ep}")
        opt.zero_grad(); (loss + fl).backward(); opt.step()
        tot["task"] += loss.item(); tot["f"] += float(fl.detach()); tot["acc"] += ((logit > 0).long() == y).float().mean().item(); nb += 1
    sched.step()
    diag = {k: {kk: round(v, 3) for kk, v in f.diagnostics().items() if kk in ("spatial_entropy", "silent_fraction", "mean_max", "diversity", "decorrelation", "batch_mode_share", "batch_peak_correlation")} for k, f in fls.items()}
    print(f"ep{ep} task {tot['task']/nb:.4f} acc {tot['acc']/nb:.3f} floss {tot['f']/nb:.4g} {diag} {time.time()-t0:.0f}s", flush=True)

# ---- evaluation on the cached eval features
m.eval()
if args.save:
    torch.save(m.state_dict(), args.save)
geom = layer_geometry(m, "new")
hh = ww = 7 * args.size // 224
ctr = unit_centers(geom, hh, ww).reshape(-1, 2).double()
K = ev["lm"].shape[1]
res = {}
with torch.no_grad():
    for layer in ("new", "top"):
        inst = LocationInstability(1280, ["head", "back", "tail"], 2, top_k=100)
        n_pos = int(ev["y"].sum())
        inst_q = LocationInstability(1280, ["head", "back", "tail"], 2, top_k=max(2, round(n_pos * 100 / 243)))  # the test's share of birds
        col = FilterCollapse(1280, 2, ["head", "back", "tail"])
        correct = 0
        for s in range(0, len(ev["y"]), 64):
            x = ev["x"][s:s + 64].float(); y = ev["y"][s:s + 64]; lm = ev["lm"][s:s + 64]
            relu, masked, logit = run_layers(m, x)
            mp = masked[layer]
            b = mp.shape[0]
            sc, u = mp.reshape(b, 1280, -1).max(-1)
            uxy = ctr[u]
            inst.update(sc.double(), uxy, lm, y, (args.size, args.size))
            inst_q.update(sc.double(), uxy, lm, y, (args.size, args.size))
            col.update(sc, u, y, landmark_distances(uxy, lm, (args.size, args.size)))
            correct += int(((logit.squeeze(1) > 0).long() == y).sum())
        r = inst.compute(categories=torch.ones(1280, dtype=torch.long) if interp else None)
        refs = inst.references(ctr.reshape(hh, ww, 2), draws=5)
        c = col.compute()
        rq = inst_q.compute(categories=torch.ones(1280, dtype=torch.long) if interp else None)
        res[layer] = {"instab": r.score, "instab_q": rq.score, "top_k_q": inst_q.top_k, "firing": r.score_firing, "random": refs.random, "fixed": refs.fixed, "landmark": refs.best_landmark_unit,
                      "landmark_mean": refs.mean_landmark_unit,
                      "silent": float(r.silent_fraction.mean()),
                      "per_lm": dict(zip(["head", "back", "tail"], [round(v, 4) for v in torch.nanmean(r.per_filter_landmark, 0).tolist()])),
                      **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in c.summary().items()}}
        res["acc"] = correct / len(ev["y"])
out = {"args": vars(args), "res": res, "seconds": time.time() - t0}
print("RESULT", json.dumps(out), flush=True)

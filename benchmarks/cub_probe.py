"""Research probe (issue 9): CUB subset, EfficientNet-Lite0 ImageNet stem frozen and cached; train top
(conv_head+bn2), new layer and head; evaluate with icnn.evaluate on the full model."""
import argparse, json, time, os, copy
import torch, torch.nn as nn, torch.nn.functional as F
from icnn.models.registry import build_model
from icnn.models.net import new_conv_layer, InterpretableLayer
from icnn.mask import PartMask
from icnn.data import build_dataset
from icnn.loss import FilterLoss
from icnn.evaluate import evaluate as ev, EvalConfig

ap = argparse.ArgumentParser()
ap.add_argument("--epochs", type=int, default=6); ap.add_argument("--lr", type=float, default=0.01)
ap.add_argument("--top-lr", type=float, default=0.001)
ap.add_argument("--bs", type=int, default=32); ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--variants", default="ordinary,interp")
ap.add_argument("--floss", default="{}"); ap.add_argument("--layers", default="top,new")
ap.add_argument("--lam", type=float, default=0.01)
ap.add_argument("--mask-warmup", type=float, default=0.0); ap.add_argument("--mask", default="{}")
ap.add_argument("--head", default="gap"); ap.add_argument("--width", type=int, default=1280)
ap.add_argument("--floss-start", type=float, default=0.0)
ap.add_argument("--nneg", type=int, default=300); ap.add_argument("--opt", default="sgd")
ap.add_argument("--data", default="../shared/data", help="folder holding cub200-subset/ and negatives/")
ap.add_argument("--cache-dir", default=".cache/cub_probe", help="cached stem outputs and ordinary results")
args = ap.parse_args()
ROOT = os.path.join(args.data, "cub200-subset/CUB_200_2011"); NEG = os.path.join(args.data, "negatives")
os.makedirs(args.cache_dir, exist_ok=True)
torch.set_num_threads(int(os.environ.get("NT", "1")))
torch.manual_seed(0)


def data(split):
    p = os.path.join(args.cache_dir, f"stem_{split}_{args.nneg}.pt")
    if os.path.exists(p):
        return torch.load(p)
    ds = build_dataset("cub200", ROOT, split=split, task="single", image_size=224, negatives_root=NEG, max_negatives=args.nneg)
    m = build_model("efficientnet_lite0", num_classes=1, interpretable=False, weights="imagenet", image_size=224).eval()
    xs, fl, ys = [], [], []
    with torch.no_grad():
        for i in range(0, len(ds), 50):
            s = [ds[j] for j in range(i, min(i + 50, len(ds)))]
            im = torch.stack([t["image"] for t in s])
            xs.append(m.stem(m.normalize(im)))
            if split == "train":
                fl.append(m.stem(m.normalize(im.flip(-1))))
            ys.append(torch.tensor([int(t["label"]) for t in s]))
    d = {"x": torch.cat(xs), "y": torch.cat(ys)}
    if fl:
        d["xf"] = torch.cat(fl)
    torch.save(d, p)
    return d


tr = data("train")
test_ds = build_dataset("cub200", ROOT, split="test", task="single", image_size=224, negatives_root=NEG, max_negatives=args.nneg)
print("data", tr["x"].shape, len(test_ds), flush=True)


class BNHead(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1); self.bn = nn.BatchNorm1d(c); self.drop = nn.Dropout(0.2); self.fc = nn.Linear(c, 1)
        nn.init.normal_(self.fc.weight, 0, 0.01); nn.init.zeros_(self.fc.bias)

    def forward(self, x):
        return self.fc(self.drop(self.bn(self.pool(x).flatten(1))))


def build(interp):
    torch.manual_seed(args.seed)
    m = build_model("efficientnet_lite0", num_classes=1, interpretable=interp, weights="imagenet", image_size=224,
                    mask=json.loads(args.mask))
    torch.manual_seed(args.seed + 1)
    if args.width != 1280:
        conv = new_conv_layer(1280)
        c2 = nn.Conv2d(1280, args.width, 3, padding=1); nn.init.kaiming_normal_(c2.weight, mode="fan_out", nonlinearity="relu"); nn.init.zeros_(c2.bias)
        conv.conv = c2
        m.layers["new"] = InterpretableLayer(conv, PartMask(**json.loads(args.mask)) if interp else None)
    c = args.width
    if args.head == "bn":
        m.head = BNHead(c)
    elif args.head == "max":
        m.head = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(1), nn.Dropout(0.2), nn.Linear(c, 1))
        nn.init.normal_(m.head[3].weight, 0, 0.01); nn.init.zeros_(m.head[3].bias)
    elif args.head == "gap":
        m.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Dropout(0.2), nn.Linear(c, 1))
        nn.init.normal_(m.head[3].weight, 0, 0.01); nn.init.zeros_(m.head[3].bias)
    return m


def run(variant):
    interp = variant != "ordinary"
    m = build(interp)
    fls = {}; on = "relu"
    if interp:
        cfg = {"lambda_": args.lam, **json.loads(args.floss)}
        on = cfg.pop("on", "relu")
        for name in args.layers.split(","):
            C = 1280 if name == "top" else args.width
            fls[name] = FilterLoss(C, 2, (7, 7), negative_class=0, **cfg)
    top_p = list(m.layers["top"].parameters())
    rest = [p for n, p in m.named_parameters() if not n.startswith("layers.top") and not n.startswith("stem")]
    for p in m.stem.parameters():
        p.requires_grad_(False)
    groups = [{"params": top_p, "lr": args.top_lr}, {"params": rest, "lr": args.lr}]
    opt = torch.optim.SGD(groups, momentum=0.9, weight_decay=5e-4) if args.opt == "sgd" else torch.optim.Adam(groups)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs)
    n = tr["x"].shape[0]
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    m.train(); m.stem.eval()
    for ep in range(1, args.epochs + 1):
        for f in fls.values():
            f.start_epoch(ep)
        perm = torch.randperm(n, generator=g)
        tot = {"task": 0.0, "f": 0.0, "acc": 0.0}; nb = 0
        for i in range(0, n - args.bs + 1, args.bs):
            idx = perm[i:i + args.bs]
            prog = (ep - 1) + i / n
            if interp:
                st = min(1.0, prog / args.mask_warmup) if args.mask_warmup > 0 else 1.0
                for L in m.layers.values():
                    L.mask.strength = st
            flip = torch.rand(len(idx), generator=g) < 0.5
            x = torch.where(flip[:, None, None, None], tr["xf"][idx], tr["x"][idx]); y = tr["y"][idx]
            relu, masked = {}, {}
            h = x
            for name, L in m.layers.items():
                relu[name], masked[name] = L(h); h = masked[name]
            logit = m.head(h).squeeze(1)
            loss = F.softplus(-(2 * y.float() - 1) * logit).mean()
            fl = torch.zeros(())
            if prog >= args.floss_start:
                fl = sum((fls[k]((masked if on == "masked" else relu)[k], y) for k in fls), torch.zeros(()))
            if not torch.isfinite(loss + fl):
                raise SystemExit(f"non-finite ep{ep} i{i} task {loss.item()} fl {float(fl)} " + str({k: f.diagnostics() for k, f in fls.items()}))
            (loss + fl).backward(); opt.step(); opt.zero_grad()
            tot["task"] += loss.item(); tot["f"] += float(fl); tot["acc"] += ((logit > 0).long() == y).float().mean().item(); nb += 1
        sched.step()
        diag = {k: {kk: round(v, 4) for kk, v in f.diagnostics().items() if kk in ("lambda", "neg_mi", "spatial_entropy", "silent_fraction", "mean_max")} for k, f in fls.items()}
        print(f"[{variant}] ep{ep} task {tot['task']/nb:.4f} acc {tot['acc']/nb:.3f} floss {tot['f']/nb:.4g} {diag} {time.time()-t0:.0f}s", flush=True)
    r = ev(m, test_ds, EvalConfig(progress=False, reference_draws=5)).metrics
    out = {"acc": r["accuracy"], "instab": r["location_instability"], "silent": r["silent_fraction"], **r["instability_references"]}
    return out


res = {}
for v in args.variants.split(","):
    key = os.path.join(args.cache_dir, f"ord_{args.head}_{args.width}_{args.epochs}_{args.seed}_{args.bs}.json")
    if v == "ordinary" and os.path.exists(key):
        res[v] = json.load(open(key)); print("ordinary (cached)", json.dumps(res[v]), flush=True); continue
    res[v] = run(v); print(v, json.dumps(res[v]), flush=True)
    if v == "ordinary":
        json.dump(res[v], open(key, "w"))
if "ordinary" in res and "interp" in res:
    print("RATIO instab %.3f acc %+.1f pts" % (res["interp"]["instab"] / res["ordinary"]["instab"], 100 * (res["interp"]["acc"] - res["ordinary"]["acc"])))
print(json.dumps({"args": vars(args), "res": res}))

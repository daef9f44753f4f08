"""Learning, matching, saving and resuming a graph; a tiny end-to-end run on a real (small) CNN."""

import dataclasses
import math

import pytest
import torch

import icnn
import icnn.data
import icnn.graph.learn as learn_mod
from icnn.graph import (
    ExplanatoryGraph,
    FeatureStore,
    GraphConfig,
    GraphError,
    LayerInfo,
    evaluate_graph,
    extract_features,
    learn_graph,
    match,
    write_features,
)
from icnn.report.graph import graph_section, node_patches


def blob(side, centre, sigma=0.6):
    r = torch.arange(side, dtype=torch.float32)
    return torch.exp(-((r[:, None] - centre[0]) ** 2 + (r[None, :] - centre[1]) ** 2) / (2 * sigma**2))


def planted_store(root, n=24, side=12, offset=(2.0, -1.0), chunk=5, seed=0):
    """Two layers of one filter each (same grid, stride 8): the upper filter fires at a random
    point p_I, the lower one at p_I + offset."""
    g = torch.Generator().manual_seed(seed)
    centres = 4 + 3 * torch.rand(n, 2, generator=g)  # (N, 2) (row, col) in [4, 7]
    off = torch.tensor(offset)
    upper = torch.stack([blob(side, c)[None] for c in centres])  # (N, 1, H, W)
    lower = torch.stack([blob(side, c + off)[None] for c in centres])
    layers = [LayerInfo(name, 1, (side, side), (8, 8), (3.5, 3.5)) for name in ("low", "up")]
    chunks = [({"low": lower[a : a + chunk], "up": upper[a : a + chunk]}, torch.full((len(centres[a : a + chunk]), 1, 2), float("nan")),
               torch.arange(a, min(n, a + chunk))) for a in range(0, n, chunk)]  # fmt: skip
    sigma = {name: torch.ones(1, side, side) for name in ("low", "up")}
    return write_features(root, layers, chunks, sigma, image_hw=(96, 96), landmark_names=["none"]), centres


PLANTED = GraphConfig(density=(1 / 144, 1 / 144), top_n=1, min_var_rate=0.0, iterations=20, chunk_images=5)


# the code's response window sits at round(m) while it reports m + o (SPEC §2c.5): up to half a cell off
@pytest.mark.parametrize("faithful, tol", [(False, 0.3), (True, 0.5)])
def test_planted_offset_is_recovered(tmp_path, faithful, tol):
    store, centres = planted_store(tmp_path / "f")
    graph = learn_graph(store, tmp_path / "g", dataclasses.replace(PLANTED, faithful=faithful), progress_bar=False)
    low, up = graph.nodes
    assert low.parents.tolist() == [[0]]
    # the edge's displacement mu_V - E_I p_U is the planted offset
    assert (low.mu[0, 0] - up.mean_pos[0]).tolist() == pytest.approx([2.0, -1.0], abs=tol)
    # and the child follows its parent image by image, to within the candidate spacing (2/3) plus
    # the deformation prior's pull towards the node's mean
    err = (low.pos[:, 0] - (centres + torch.tensor([2.0, -1.0]))).abs()
    assert err.mean() < 0.4 and err.max() < 1.0
    assert (up.pos[:, 0] - centres).abs().max() < 1.0


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    store, _ = planted_store(root / "f")
    return store, learn_graph(store, root / "g", PLANTED, progress_bar=False), root


def test_match_is_deterministic_and_chunking_free(planted, tmp_path):
    store, graph, _ = planted
    a, b = match(graph, store, progress_bar=False), match(graph, store, progress_bar=False)
    other, _ = planted_store(tmp_path / "f7", chunk=7)  # the same images in other files, other batches
    batched = dataclasses.replace(graph, config=dataclasses.replace(graph.config, chunk_images=3))
    for c in (match(graph, other, progress_bar=False), match(batched, store, progress_bar=False)):
        for x, y, z in zip(a, b, c):
            assert torch.equal(x.pos, y.pos) and torch.equal(x.log_score, y.log_score)
            assert torch.equal(x.pos, z.pos) and torch.equal(x.log_score, z.log_score)


def test_save_load_round_trip(planted):
    store, graph, root = planted
    back = ExplanatoryGraph.load(root / "g")
    assert back.config == graph.config and back.layers == graph.layers and back.history == graph.history
    for x, y in zip(graph.nodes, back.nodes):
        for name in ("mu", "sigma", "parents", "strength", "mean_pos", "pos", "log_score"):
            assert torch.equal(getattr(x, name), getattr(y, name))
    assert not list((root / "g").glob("*.tmp"))
    for x, y in zip(match(graph, store, progress_bar=False), match(back, store, progress_bar=False)):
        assert torch.equal(x.pos, y.pos) and torch.equal(x.log_score, y.log_score)


def test_resume_after_a_crash_continues_from_the_last_saved_layer(tmp_path, monkeypatch):
    store, _ = planted_store(tmp_path / "f")
    whole = learn_graph(store, tmp_path / "whole", PLANTED, progress_bar=False)
    calls = {"n": 0}
    real = learn_mod.infer_layer

    def crash_in_second_layer(graph, l, *args, **kw):
        calls["n"] += 1
        if l == 0:
            raise KeyboardInterrupt
        return real(graph, l, *args, **kw)

    monkeypatch.setattr(learn_mod, "infer_layer", crash_in_second_layer)
    with pytest.raises(KeyboardInterrupt):
        learn_graph(store, tmp_path / "g", PLANTED, progress_bar=False)
    top_calls = calls["n"] - 1  # the top layer ran completely, then the crash
    assert ExplanatoryGraph.load(tmp_path / "g").nodes[0] is None
    monkeypatch.setattr(learn_mod, "infer_layer", real)
    calls["n"] = 0
    monkeypatch.setattr(learn_mod, "infer_layer", lambda *a, **k: (calls.__setitem__("n", calls["n"] + 1), real(*a, **k))[1])
    resumed = learn_graph(store, tmp_path / "g", PLANTED, progress_bar=False)
    assert calls["n"] == top_calls  # only the bottom layer was learned again
    for x, y in zip(whole.nodes, resumed.nodes):
        assert torch.equal(x.mu, y.mu) and torch.equal(x.pos, y.pos)
    with pytest.raises(GraphError, match="root"):
        learn_graph(store, tmp_path / "g", GraphConfig(iterations=3), progress_bar=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """small_cnn on 32 synthetic samples (16 objects with landmarks, 16 negatives)."""
    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    model = icnn.build_model("small_cnn", num_classes=1, interpretable=False, image_size=64)
    data = icnn.data.build_dataset("synthetic", split="train", task="single", image_size=64, num_samples=32)
    layers = ("stem.block3.bn", "layers.top.body.block4.bn")
    store = extract_features(model, data, root / "features", layers=layers, chunk_size=6, progress_bar=False)
    graph = learn_graph(store, root / "graph", GraphConfig(density=(0.02, 0.05), iterations=2, chunk_images=4), progress_bar=False)
    return model, data, store, graph


def test_tiny_end_to_end(tiny):
    _, data, store, graph = tiny
    assert store.num_images == 16 and store.num_chunks == 3
    assert [L.size for L in store.layers] == [(16, 16), (8, 8)] and store.layers[1].stride == (8, 8)
    assert store.landmark_names == data.landmark_names and torch.isfinite(store.landmarks).any()
    assert [n.mu.shape for n in graph.nodes] == [(128, 6, 2), (128, 4, 2)]
    assert graph.nodes[0].parents.shape == (768, 15) and graph.nodes[1].parents.shape == (512, 0)
    assert len(graph.history) == 4 and all(math.isfinite(h["mean_log_score"]) for h in graph.history)
    result = evaluate_graph(graph, store, top_units=50, shots=2, votes=3, trials=2, progress_bar=False)
    inst = result["location_instability"]
    for row in inst["layers"]:
        assert all(0 < row[k] < 1 for k in ("nodes", "raw_filters", "random_unit", "best_fixed_unit"))
    assert inst["ratio"] == pytest.approx(inst["nodes"] / inst["raw_filters"])
    loc = result["part_localisation"]
    assert all(0 < loc[k] < 1 for k in ("nodes", "raw_filters", "mean_shot"))
    records = evaluate_graph(graph, store, source="records", top_units=50, shots=2, votes=3, trials=2, progress_bar=False)
    assert records["location_instability"]["layers"][1]["raw_filters"] == inst["layers"][1]["raw_filters"]
    section = graph_section(graph, store, data, result, nodes=3, patches=2)
    assert len(section.figures) == 3 and len(section.tables) == 2
    assert section.tables[0].rows[-1][1] == pytest.approx(inst["nodes"])


def test_user_mistakes_raise_one_line_errors(tiny, planted, tmp_path):
    model, data, store, _ = tiny
    with pytest.raises(GraphError, match="layers: no module named 'nope'"):
        extract_features(model, data, tmp_path / "a", layers=("nope",), progress_bar=False)
    with pytest.raises(GraphError, match="layers: must be given bottom to top"):
        extract_features(model, data, tmp_path / "b", layers=("layers.top.body.block4.bn", "stem.block3.bn"), progress_bar=False)
    with pytest.raises(GraphError, match="dataset: is empty"):
        extract_features(model, torch.utils.data.Subset(data, []), tmp_path / "c", progress_bar=False)
    with pytest.raises(GraphError, match="negatives"):
        extract_features(model, torch.utils.data.Subset(data, [1, 3]), tmp_path / "d", progress_bar=False)
    with pytest.raises(GraphError, match="density"):
        learn_graph(store, tmp_path / "e", GraphConfig(density=(0.1,)), progress_bar=False)
    with pytest.raises(GraphError, match="top_n"):
        GraphConfig(top_n=0)
    with pytest.raises(GraphError, match="features"):
        FeatureStore(tmp_path / "nothing")
    store, graph, _ = planted  # its landmarks are all NaN
    with pytest.raises(GraphError, match="landmarks: the features have no landmarks"):
        evaluate_graph(graph, store, progress_bar=False)
    with pytest.raises(GraphError, match="landmarks: 'beak'"):
        evaluate_graph(graph, store, landmarks=["beak"], progress_bar=False)
    with pytest.raises(GraphError, match="source"):
        evaluate_graph(graph, store, source="nope", progress_bar=False)


def test_node_patches_centre_the_point_and_pad_outside():
    """A 1-pixel dot at (x, y) = (10.5, 5.5) (pixel (row 5, col 10)) sits at the middle of its
    4 px patch (pixels 2 of 0..3 each way); a patch over the corner is zero outside the image."""
    img = torch.zeros(3, 16, 16)
    img[:, 5, 10] = 1.0
    grid = node_patches([[img, img]], torch.tensor([[[10.5, 5.5], [0.0, 0.0]]]), patch=4, tile=4, gap=1)
    assert grid.shape == (4, 9, 3)
    assert grid[2, 2].tolist() == [1.0, 1.0, 1.0] and grid[:, :4].sum() == 3.0
    assert grid[:, 5:].sum() == 0.0  # the corner patch: the image's zeros and the padding
    assert (grid[:, 4] == 1.0).all()  # the white gap


def test_sigma_neg_default_is_per_channel_and_faithful_keeps_the_codes(tmp_path):
    """``sigma_neg="auto"`` (the default) normalises per channel; with ``faithful`` per unit, as the
    authors' code does: the learned graphs equal those of the explicit settings, and differ from
    each other where the per-unit spread varies over the map."""
    assert GraphConfig().sigma_neg == "channel"
    assert GraphConfig(faithful=True).sigma_neg == "unit"
    assert GraphConfig(faithful=True, sigma_neg="channel").sigma_neg == "channel"
    assert GraphConfig.from_dict(GraphConfig(faithful=True).to_dict()).sigma_neg == "unit"
    with pytest.raises(GraphError, match="sigma_neg"):
        GraphConfig(sigma_neg="pixel")
    store, _ = planted_store(tmp_path / "f")
    g = torch.Generator().manual_seed(1)
    for name in ("low", "up"):  # a small spread at the border, as a padded backbone's
        store.sigma[name] = 0.2 + torch.rand(1, 12, 12, generator=g)
    cfg = dict(density=(1 / 144, 1 / 144), top_n=1, min_var_rate=0.0, iterations=3, chunk_images=5)

    def mu(path, **kw):
        return torch.cat([n.mu.flatten() for n in learn_graph(store, tmp_path / path, GraphConfig(**cfg, **kw), progress_bar=False).nodes])

    assert torch.equal(mu("a", sigma_neg="auto"), mu("b", sigma_neg="channel"))
    assert torch.equal(mu("c", faithful=True), mu("d", faithful=True, sigma_neg="unit"))
    assert not torch.equal(mu("e", sigma_neg="unit"), mu("f2", sigma_neg="channel"))

"""The frozen stem computed once (icnn.cache): same numbers as computing it every time, nothing
stale ever served."""

import dataclasses

import torch

from icnn.cache import StemCache
from icnn.training import TrainConfig, load_checkpoint, train

from .fakes import TinyParts, tiny_net


def _stem(model):
    return torch.nn.Sequential(model.normalize, model.stem)


def test_cached_features_are_the_stems_outputs_for_each_view(tmp_path):
    model = tiny_net().eval()
    data = TinyParts(6)
    for cache_dir in (None, tmp_path):
        cache = StemCache(_stem(model), cache_dir=cache_dir, batch_size=4, progress=False)
        cached = cache.dataset(data, flips=True)
        assert len(cached) == 6 and cached.classes == data.classes
        for i in range(6):
            for view, image in enumerate((data[i]["image"], data[i]["image"].flip(-1))):
                want = _stem(model)(image[None])[0]
                torch.testing.assert_close(cache.store.get([cached.keys[i][view]])[0], want, rtol=1e-5, atol=1e-6)
        assert cache.computed == 12  # every view once


def test_a_second_pass_computes_nothing_and_another_stem_is_not_served(tmp_path):
    model = tiny_net().eval()
    data = TinyParts(4)
    first = StemCache(_stem(model), cache_dir=tmp_path, progress=False)
    first.dataset(data)
    again = StemCache(_stem(model), cache_dir=tmp_path, progress=False)  # a new process, the same disk cache
    again.dataset(data)
    assert first.computed == 4 and again.computed == 0
    other = tiny_net(seed=1).eval()  # other weights: another digest, nothing reused
    changed = StemCache(_stem(other), cache_dir=tmp_path, progress=False)
    changed.dataset(data)
    assert changed.computed == 4 and changed.digest != first.digest
    data.images[0] += 0.1  # another image: another key
    again.dataset(data)
    assert again.computed == 1


def test_two_runs_sharing_a_cache_dir_each_read_their_own_features(tmp_path):
    """Two processes on one --cache-dir append rows under a lock and merge the index: each reads the
    stem's outputs for its own images (not the other's rows), and a killed writer's partial row
    (bytes past the index) is dropped, not read as the next image's features."""
    model = tiny_net().eval()
    a_data, b_data = TinyParts(3), TinyParts(5, seed=7)
    a = StemCache(_stem(model), cache_dir=tmp_path, progress=False)
    b = StemCache(_stem(model), cache_dir=tmp_path, progress=False)  # opened before a wrote anything
    a_set = a.dataset(a_data)
    with open(a.store.root / "features.f32", "ab") as f:
        f.write(b"\0" * 10)  # a writer killed mid-row
    b_set = b.dataset(b_data)
    for cache, data, cached in ((a, a_data, a_set), (b, b_data, b_set)):
        for i in range(len(data)):
            want = _stem(model)(data[i]["image"][None])[0]
            torch.testing.assert_close(cache.store.get([cached.keys[i][0]])[0], want, rtol=1e-5, atol=1e-6)
    later = StemCache(_stem(model), cache_dir=tmp_path, progress=False)
    later.dataset(a_data), later.dataset(b_data)
    assert later.computed == 0 and len(later.store.rows) == 8


def test_training_on_the_cache_equals_training_on_the_images(tmp_path):
    base = TrainConfig(arch="tiny", image_size=16, epochs=2, batch_size=4, lr=0.05, seed=3, device="cpu", progress=False,
                       log_every=0, eval_split=None, freeze_stem=True, filter_loss={"lambda_": 0.1})  # fmt: skip
    # the images, flipped by the dataset itself (the stem computed every step) ...
    on_images = dataclasses.replace(base, out=str(tmp_path / "images"))
    train(on_images, model=tiny_net(seed=5), train_set=TinyParts(12, augment=True))
    # ... and the cache, which draws the same flips
    on_cache = dataclasses.replace(base, out=str(tmp_path / "cache"), augment=True)
    model = tiny_net(seed=5)
    cache = StemCache(_stem(model), progress=False)
    train(on_cache, model=model, train_set=TinyParts(12), cache=cache)
    assert cache.computed == 24  # 12 images x 2 views, once for both epochs
    a, b = load_checkpoint(tmp_path / "images")[0], load_checkpoint(tmp_path / "cache")[0]
    moved = max(float((a[k] - tiny_net(seed=5).state_dict()[k]).abs().max()) for k in a)
    assert moved > 1e-3
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=k)

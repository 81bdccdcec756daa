"""Propagation of one prompt through a volume (medsa.engine.propagate, issue #11).

The propagation LOGIC (next-slice prompts, stop rule, several keys, corrections) is checked with a
deterministic stub predictor that segments the bright connected component under the prompt
(``ComponentPredictor`` in conftest.py); the
batched / chunked encoding with a tiny random model; the whole chain on real data with LiteMedSAM.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medsa.data.prompts import Prompt
from medsa.engine.propagate import (
    PropagationResult,
    VolumePropagator,
    next_prompt,
    propagate_volume,
)
from medsa.errors import DataError, PromptError

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def _disc(h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


def _moving_volume(d: int = 40, first: int = 8, last: int = 31, jump_at: int | None = None):
    """``(D, 64, 64)`` volume: a disc on slices first..last moving right/down and shrinking, plus a
    bright distractor in a corner on every slice. ``jump_at``: the disc jumps far from there on."""
    h = w = 64
    vol = np.zeros((d, h, w), np.float32)
    target = np.zeros((d, h, w), bool)
    for z in range(first, last + 1):
        t = (z - first) / (last - first)
        cy, cx, r = 20 + 20 * t, 18 + 22 * t, 12 - 8 * t
        if jump_at is not None and z >= jump_at:
            cy, cx = cy - 20, cx - 14  # no overlap with the slice before the jump
        target[z] = _disc(h, w, cy, cx, r)
    vol[target] = 1000.0
    vol[:, 58:63, 2:7] = 1000.0  # distractor, never part of the object
    vol += np.random.default_rng(0).normal(0, 5, vol.shape).astype(np.float32)
    return vol, target


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


def _box(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], np.float32)


def test_one_box_reaches_the_object_ends(component):
    vol, target = _moving_volume()
    stub = component()
    seen: list[tuple[int, int]] = []
    res = propagate_volume(
        stub, vol, {15: Prompt(box=_box(target[15]))}, progress=lambda a, b: seen.append((a, b))
    )
    assert isinstance(res, PropagationResult)
    assert res.masks.shape == target.shape and res.masks.dtype == bool
    assert _dice(res.masks, target) >= 0.9
    assert res.z_range == (8, 31)
    assert not res.masks[:8].any() and not res.masks[32:].any()  # stopped at both ends
    # scores: predicted on 7..32 (the two slices where the object was found missing included)
    assert np.isfinite(res.scores[7:33]).all() and np.isnan(res.scores[:7]).all()
    assert np.isnan(res.scores[33:]).all()
    assert stub.n_set == 26  # slices beyond the object's ends were never looked at
    # each next slice was prompted with the previous mask's box (default feed: box only)
    assert all(p["box"] is not None and p["mask_input"] is None for p in stub.prompts[1:])
    assert seen[-1][0] == seen[-1][1] and all(a <= b for a, b in seen)
    # feed="box+mask" also passes the previous low-res logits
    stub = component()
    res2 = propagate_volume(stub, vol, {15: Prompt(box=_box(target[15]))}, feed="box+mask")
    np.testing.assert_array_equal(res2.masks, res.masks)
    assert all(p["box"] is not None and p["mask_input"] is not None for p in stub.prompts[1:])


def test_directions_and_stop_rules(component):
    vol, target = _moving_volume()
    key = {15: Prompt(box=_box(target[15]))}
    up = propagate_volume(component(), vol, key, direction="up")
    assert up.z_range == (15, 31)
    down = propagate_volume(component(), vol, key, direction="down")
    assert down.z_range == (8, 15)
    # min_area: the disc shrinks with z, so a large min_area ends the object early going up
    area = target.reshape(len(target), -1).sum(1)
    small = propagate_volume(component(), vol, key, min_area=int(area[25]) + 1)
    assert small.z_range == (8, 24)
    # min_score above the stub's score: nothing beyond the key
    strict = propagate_volume(component(), vol, key, min_score=0.99)
    assert strict.z_range == (15, 15)
    with pytest.raises(PromptError, match="direction"):
        propagate_volume(component(), vol, key, direction="sideways")
    with pytest.raises(PromptError, match="outside the volume"):
        propagate_volume(component(), vol, {40: Prompt(box=[1, 1, 5, 5])})
    with pytest.raises(PromptError, match="at least one key"):
        propagate_volume(component(), vol, {})
    with pytest.raises(PromptError, match="shape"):
        propagate_volume(component(), vol, {3: np.zeros((5, 5), bool)})
    with pytest.raises(DataError):
        VolumePropagator(component(), np.zeros((4, 4)))


def test_correction_repropagates_from_the_corrected_slice(component):
    # the object jumps sideways at slice 20: propagation from slice 12 loses it there
    vol, target = _moving_volume(jump_at=20)
    stub = component()
    with VolumePropagator(stub, vol) as prop:
        first = prop.propagate({12: Prompt(box=_box(target[12]))})
        assert first.z_range == (8, 19)
        assert _dice(first.masks, target) < 0.9
        # the user corrects slice 26 with a mask (kept verbatim, one pixel removed to see that)
        fix = target[26].copy()
        ys, xs = np.nonzero(fix)
        fix[ys[0], xs[0]] = False
        n_before = stub.n_set
        second = prop.propagate({12: Prompt(box=_box(target[12])), 26: fix})
    np.testing.assert_array_equal(second.masks[26], fix)
    assert second.z_range == (8, 31) and second.scores[26] == 1.0
    assert _dice(second.masks, target) >= 0.95
    # between the keys each slice comes from the nearer key: 13..19 from 12, 20..25 from 26
    np.testing.assert_array_equal(second.masks[:20], first.masks[:20])
    assert stub.n_set > n_before


def test_absent_key_stops_propagation(component):
    vol, target = _moving_volume()
    res = propagate_volume(
        component(), vol, {12: Prompt(box=_box(target[12])), 20: np.zeros((64, 64), bool)}
    )
    assert res.z_range == (8, 19)  # slices 17..19 come from key 12, not from the absent key
    assert not res.masks[20:].any()


def test_point_key_and_next_prompt_feeds(component):
    vol, target = _moving_volume()
    cy, cx = np.argwhere(target[20]).mean(0)
    res = propagate_volume(component(), vol, {20: Prompt(points=[[cx, cy]])}, feed="box")
    assert res.z_range == (8, 31)
    prev = type("R", (), {"mask": target[20], "logits": np.ones((1, 8, 8), np.float32)})()
    p = next_prompt(prev, "box", box_margin=0.1)  # type: ignore[arg-type]
    b0 = _box(target[20])
    assert p.mask_input is None and (p.box[:2] < b0[:2]).all() and (p.box[2:] > b0[2:]).all()
    p = next_prompt(prev, "box+point")  # type: ignore[arg-type]
    assert target[20][int(p.points[0, 1]), int(p.points[0, 0])]
    p = next_prompt(prev, "mask")  # type: ignore[arg-type]
    assert p.box is None and p.mask_input is not None and len(p.points) == 1
    with pytest.raises(PromptError, match="feed"):
        next_prompt(prev, "logits")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- real encoders


def _count_forwards(model) -> list[int]:
    calls: list[int] = []
    model.image_encoder.register_forward_hook(lambda m, i, o: calls.append(int(o.shape[0])))
    return calls


def test_batched_embeddings_match_set_image(tiny_model):
    torch = pytest.importorskip("torch")
    from medsa.engine.inference import model_input
    from medsa.sam import SamPredictor

    vol = np.random.default_rng(1).normal(size=(7, 30, 40)).astype(np.float32)
    pred = SamPredictor(tiny_model)
    prop = VolumePropagator(pred, vol, batch_size=3)
    handle_calls: list[int] = []
    h = tiny_model.image_encoder.register_forward_hook(
        lambda m, i, o: handle_calls.append(int(o.shape[0]))
    )
    try:
        prop.embed(range(7))
        assert handle_calls == [3, 3, 1] and prop.n_encoded == 7
        prop.embed([2, 5])  # cached: no encoder pass
        assert handle_calls == [3, 3, 1]
        feats = prop._features[5].clone()
        pred.set_image(model_input(vol, True)[5])
        torch.testing.assert_close(feats, pred.features, atol=1e-4, rtol=1e-4)
        # decoding through the propagator = decoding after set_image
        r = prop.segment_slice(5, Prompt(box=[5, 5, 25, 20]))
        pred.set_image(model_input(vol, True)[5])
        m, s, _ = pred.predict(box=np.array([5, 5, 25, 20]), multimask_output=False)
        np.testing.assert_array_equal(r.mask, m[0])
        assert abs(r.score - float(s[0])) < 1e-4 and r.logits is not None
    finally:
        h.remove()
    prop.close()
    assert prop.embedded == frozenset()


def test_lazy_encoding_in_the_propagation_direction(tiny_model):
    vol = np.random.default_rng(2).normal(size=(14, 32, 32)).astype(np.float32)
    calls = []
    h = tiny_model.image_encoder.register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
    try:
        with VolumePropagator(tiny_model, vol, batch_size=3) as prop:
            key = {6: Prompt(box=[4, 4, 28, 28])}
            res = prop.propagate(key, min_score=-1.0, min_area=1)
            visited = np.flatnonzero(np.isfinite(res.scores))
            assert all(c <= 3 for c in calls) and sum(calls) == prop.n_encoded
            # nothing encoded further than batch_size - 1 beyond the visited slices
            assert all(visited.min() - 2 <= z <= visited.max() + 2 for z in prop.embedded)
            # the key was encoded together with the next slices up (one forward of 3)
            assert calls[0] == 3 and {6, 7, 8} <= prop.embedded
            n_calls = len(calls)
            again = prop.propagate(key, min_score=-1.0, min_area=1)  # all cached: decoder only
            assert len(calls) == n_calls
            np.testing.assert_array_equal(again.masks, res.masks)
    finally:
        h.remove()


def test_depth_chunks_with_sd_trans_adapter(component):
    torch = pytest.importorskip("torch")
    from medsa.adapters import MedSAConfig, apply_method
    from medsa.engine.inference import ChunkEncoder, model_input
    from medsa.sam import SamPredictor, build_sam

    torch.manual_seed(0)
    model = apply_method(build_sam("vit_tiny"), MedSAConfig(sd_trans=True)).eval()
    for m in model.modules():  # make the (zero-initialised) adapters matter
        if m.__class__.__name__ in ("SDTrans", "Adapter"):
            for prm in m.parameters():
                torch.nn.init.normal_(prm, std=0.1)
    vol = np.random.default_rng(3).normal(size=(7, 30, 40)).astype(np.float32)
    x = model_input(vol, True)
    pred = SamPredictor(model)
    prop = VolumePropagator(pred, vol, depth=3, batch_size=6)  # 2 chunks per forward
    calls = _count_forwards(model)
    prop.embed([6, 0])  # chunks 2 and 0, one forward of 2 chunks (6 slices)
    assert calls == [6] and prop.embedded == {0, 1, 2, 6}
    ref = SamPredictor(model)
    enc = ChunkEncoder(ref, x, depth=3)
    with torch.inference_mode():
        for z in (1, 6):  # slice 6's chunk is (6, 6, 6): padded by repetition
            enc.set_slice(z)
            torch.testing.assert_close(prop._features[z], ref.features, atol=1e-4, rtol=1e-4)
        flat = SamPredictor(model)
        flat.set_image(x[1])
        assert (flat.features - prop._features[1]).abs().max() > 1e-3  # depth really used
    res = prop.propagate({4: Prompt(box=[5, 5, 25, 20])}, min_score=-1.0, min_area=1)
    assert res.masks.shape == (7, 30, 40) and np.isfinite(res.scores[4])
    assert set(prop.embedded) >= {3, 4, 5}  # the key's whole chunk was encoded together
    with pytest.raises(PromptError, match="depth"):
        VolumePropagator(component(), vol, depth=3)


# --------------------------------------------------------------------------- real data


@pytest.mark.realdata
@pytest.mark.slow
def test_litemedsam_acdc_propagation_realdata():
    """One tight box on the largest slice of the ACDC RV / LV, propagated: volume Dice, ends found."""
    case = DATA / "ACDC" / "imagesTr" / "patient001_frame01.nii.gz"
    if not case.is_file():
        pytest.skip("../shared/data/ACDC not available")
    from medsa.data.io import read_image
    from medsa.data.prompts import tight_box
    from medsa.errors import CheckpointError
    from medsa.sam import build_sam

    try:
        model = build_sam("lite_medsam")
    except CheckpointError as e:
        pytest.skip(f"LiteMedSAM weights unavailable: {e}")
    img = read_image(case).array
    lab = read_image(str(case).replace("imagesTr", "labelsTr")).array
    dice, reach = {}, {}
    with VolumePropagator(model, img) as prop:
        for c in (1, 3):  # RV, LV (zero-shot boxes on the myocardium ring give the cavity)
            t = lab == c
            zk = int(t.reshape(len(t), -1).sum(1).argmax())
            res = prop.propagate({zk: Prompt(box=tight_box(t[zk]))})
            dice[c] = _dice(res.masks, t)
            zs = np.flatnonzero(t.reshape(len(t), -1).any(1))
            reach[c] = (res.z_range, (int(zs[0]), int(zs[-1])))
    assert dice[3] > 0.9 and dice[1] > 0.75, dice
    (z0, z1), (g0, g1) = reach[3]
    assert abs(z0 - g0) <= 1 and abs(z1 - g1) <= 1, reach  # the LV's ends were found

"""Issue #11 in `medsa serve`: previous-mask feedback and several objects per image."""

from __future__ import annotations

import json

import numpy as np
import pytest
from serve_helpers import IMAGE_SHAPE, VOLUME_AFFINE, VOLUME_SHAPE

from medsa.serve.rle import rle_encode


def _open(client, path: str) -> dict:
    r = client.post("/api/open", json={"root": 0, "path": path})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture
def mask_inputs(tiny_model):
    """The ``masks`` argument of every prompt-encoder call (``None`` or a tensor)."""
    seen: list = []

    def hook(mod, args, kwargs):
        seen.append(kwargs.get("masks", args[2] if len(args) > 2 else None))

    handle = tiny_model.prompt_encoder.register_forward_pre_hook(hook, with_kwargs=True)
    yield seen
    handle.remove()


def test_previous_mask_is_fed_back_on_the_next_click(client, mask_inputs):
    vol = _open(client, "sub/vol.nii.gz")
    first = client.post(
        "/api/predict",
        json={"image": vol["id"], "slice": 2, "points": [[20, 20, 1]], "multimask": True},
    ).json()
    assert mask_inputs[-1] is None and first["mask_input_used"] is False
    tokens = [m["token"] for m in first["masks"]]
    assert len(set(tokens)) == 3  # one per candidate: the page sends back the one it shows
    chosen = tokens[first["best"]]
    second = client.post(
        "/api/predict",
        json={"image": vol["id"], "slice": 2, "points": [[20, 20, 1], [5, 5, 0]],
              "mask_input": chosen},
    )  # fmt: skip
    assert second.status_code == 200, second.text
    assert second.json()["mask_input_used"] is True
    fed = mask_inputs[-1]
    assert fed is not None
    stored = client.app.state.service.logits.get(chosen, vol["id"], 2)
    np.testing.assert_allclose(fed.detach().float().numpy().reshape(stored.shape), stored,
                               atol=1e-2)  # fmt: skip
    # a token is bound to its image and slice
    r = client.post("/api/predict", json={"image": vol["id"], "slice": 3,
                                          "points": [[20, 20, 1]], "mask_input": chosen})  # fmt: skip
    assert r.status_code == 422 and "another image or slice" in r.json()["error"]
    # an unknown (evicted) token: the click still works, without feedback
    r = client.post("/api/predict", json={"image": vol["id"], "slice": 2,
                                          "points": [[20, 20, 1]], "mask_input": "0" * 16})  # fmt: skip
    assert r.status_code == 200 and r.json()["mask_input_used"] is False
    assert mask_inputs[-1] is None


def test_several_objects_save_one_label_map_and_a_sidecar(client, roots):
    from medsa.data.io import read_image

    vol = _open(client, "sub/vol.nii.gz")
    d, h, w = VOLUME_SHAPE
    liver = np.zeros((h, w), bool)
    liver[5:20, 5:30] = True
    tumour = np.zeros((h, w), bool)
    tumour[10:15, 20:40] = True  # overlaps the liver: the later object wins there
    objects = [
        {"name": "liver", "label": 1, "masks": {"1": rle_encode(liver), "2": rle_encode(liver)}},
        {"name": "tumour", "label": 2, "masks": {"2": rle_encode(tumour)}},
        {"name": "empty", "label": 7, "masks": {}},
    ]
    r = client.post(
        "/api/save", json={"image": vol["id"], "name": "seg.nii.gz", "objects": objects}
    )
    assert r.status_code == 200, r.text
    res = r.json()
    assert res["sidecar"] == "seg.labels.json"
    assert res["labels"] == {"liver": 1, "tumour": 2, "empty": 7}
    out = read_image(roots["out"] / "seg.nii.gz")
    np.testing.assert_allclose(out.affine, VOLUME_AFFINE, atol=1e-5)  # the input's geometry
    expected = np.zeros(VOLUME_SHAPE, np.uint8)
    expected[1][liver] = 1
    expected[2][liver] = 1
    expected[2][tumour] = 2
    np.testing.assert_array_equal(out.array, expected)
    side = json.loads((roots["out"] / "seg.labels.json").read_text())
    assert side["labels"] == {"liver": 1, "tumour": 2, "empty": 7}
    assert side["image"] == "vol.nii.gz" and side["mask"] == "seg.nii.gz"


def test_2d_label_map(client, roots):
    from PIL import Image

    img = _open(client, "rgb.png")
    a = np.zeros(IMAGE_SHAPE, bool)
    a[:10] = True
    b = np.zeros(IMAGE_SHAPE, bool)
    b[-5:] = True
    objs = [{"name": "a", "label": 1, "masks": {"0": rle_encode(a)}},
            {"name": "b", "label": 3, "masks": {"0": rle_encode(b)}}]  # fmt: skip
    r = client.post("/api/save", json={"image": img["id"], "objects": objs})
    assert r.status_code == 200, r.text
    saved = np.asarray(Image.open(roots["out"] / "rgb_mask.png"))
    assert sorted(np.unique(saved).tolist()) == [0, 1, 3]
    assert (saved == 1).sum() == a.sum() and (saved == 3).sum() == b.sum()


@pytest.mark.parametrize(
    ("objects", "message"),
    [
        ([{"name": "a", "label": 1}, {"name": "a", "label": 2}], "named 'a'"),
        ([{"name": "a", "label": 1}, {"name": "b", "label": 1}], "label 1 is used"),
        ([{"name": "a", "label": 0}], "not in 1..255"),
        ([{"name": "a", "label": 256}], "not in 1..255"),
        ([{"name": " ", "label": 1}], "needs a name"),
        ([], "nothing to save"),
    ],
)
def test_bad_objects_are_422(client, roots, objects, message):
    img = _open(client, "rgb.png")
    r = client.post("/api/save", json={"image": img["id"], "objects": objects})
    assert r.status_code == 422, r.text
    assert message in r.json()["error"]
    assert not roots["out"].exists() or list(roots["out"].iterdir()) == []

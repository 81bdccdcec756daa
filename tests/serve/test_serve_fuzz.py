"""Property-based fuzzing of every `medsa serve` endpoint (Hypothesis).

Bodies follow each endpoint's request schema (the pydantic models in ``medsa.serve.app``) with every
field drawn either from its own type (including hostile values: huge or negative integers, wrong
lengths, NaN) or from arbitrary JSON; query and path parameters likewise. Properties: no answer is a
5xx, every error is JSON ``{"error": ...}``, the server still answers afterwards, and the process
memory (RSS) grows by less than ``RSS_BOUND_MB``. Bounded to ``MAX_EXAMPLES`` requests (about 30 s
on 2 CPU cores shared with other jobs) so it runs in CI.
"""

from __future__ import annotations

import json
import math

import pytest
from serve_helpers import IMAGE_SHAPE

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

MAX_EXAMPLES = 120
RSS_BOUND_MB = 300
JSON_HEADERS = {"Content-Type": "application/json"}

BIG_INTS = st.sampled_from([0, 1, -1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64 + 5, -(2**63)])
INTS = st.one_of(st.integers(-10, 100), BIG_INTS)
FLOATS = st.one_of(
    st.floats(-10, 200), st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -0.0])
)
TEXT = st.one_of(
    st.text(max_size=30),
    st.sampled_from(
        [
            "rgb.png",
            "sub/vol.nii.gz",
            "../secret.png",
            "/etc/passwd",
            "sub",
            "",
            "a" * 5000,
            "x\x00.png",
            "..",
            "out.png",
            "m.nii.gz",
        ]
    ),  # fmt: skip
)
JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), INTS, FLOATS, st.text(max_size=10)),
    lambda children: st.one_of(
        st.lists(children, max_size=5), st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=12,
)


def field(strategy: st.SearchStrategy) -> st.SearchStrategy:
    """A field's own type most of the time, arbitrary JSON sometimes."""
    return st.one_of(strategy, strategy, strategy, JSON)


def body(**fields: st.SearchStrategy) -> st.SearchStrategy:
    """Dicts with any subset of the fields (missing ones test the defaults / required errors)."""
    return st.fixed_dictionaries({}, optional={k: field(v) for k, v in fields.items()})


def rle(n: int) -> st.SearchStrategy:
    valid = st.integers(0, n).map(lambda a: [a, n - a])
    return st.one_of(valid, st.lists(INTS, max_size=8))


def requests(ids: list[str]) -> st.SearchStrategy:
    n = IMAGE_SHAPE[0] * IMAGE_SHAPE[1]
    image = st.one_of(st.sampled_from(ids), st.text(max_size=70))
    z = st.one_of(st.integers(-2, 6), BIG_INTS)
    masks = st.dictionaries(st.one_of(st.sampled_from(["0", "1", "-1", "9" * 30]), st.text(max_size=4)),
                            rle(n), max_size=3)  # fmt: skip
    point = st.one_of(st.tuples(FLOATS, FLOATS, st.sampled_from([0, 1, 2, -1])), JSON)
    predict = body(image=image, slice=z, points=st.lists(point, max_size=4),
                   box=st.lists(FLOATS, max_size=5), multimask=st.booleans(),
                   mask_input=st.text(max_size=20))  # fmt: skip
    obj = body(name=TEXT, label=INTS, masks=masks)
    save = body(image=image, name=TEXT, objects=st.lists(obj, max_size=3), masks=masks,
                overwrite=st.booleans())  # fmt: skip
    propagate = body(image=image, keys=masks, direction=st.sampled_from(["both", "up", "x"]))
    post = st.sampled_from(["/api/open", "/api/predict", "/api/embed", "/api/save",
                            "/api/propagate"])  # fmt: skip
    bodies = {
        "/api/open": body(root=INTS, path=TEXT),
        "/api/predict": predict,
        "/api/embed": body(image=image, slice=z),
        "/api/save": save,
        "/api/propagate": propagate,
    }
    posts = post.flatmap(lambda p: st.tuples(st.just("POST"), st.just(p), bodies[p]))
    gets = st.one_of(
        st.tuples(st.just("GET"), st.just("/api/files"), body(root=INTS, path=TEXT)),
        st.tuples(
            st.just("GET"),
            st.builds(lambda i, k: f"/api/images/{i}/slices/{k}", image, z),
            st.just({}),
        ),  # fmt: skip
        st.tuples(st.just("GET"), st.builds(lambda t: f"/api/download/{t}", TEXT), st.just({})),
        st.tuples(st.just("GET"), st.builds(lambda t: f"/api/jobs/{t}", TEXT), st.just({})),
        st.tuples(st.just("GET"), st.sampled_from(["/api/info", "/api/stats"]), st.just({})),
    )
    cancel = st.tuples(st.just("POST"), st.builds(lambda t: f"/api/jobs/{t}/cancel", TEXT), JSON)
    upload = st.tuples(st.just("UPLOAD"), TEXT, st.binary(max_size=300))
    raw = st.tuples(st.just("RAW"), post, st.binary(max_size=200))  # not even JSON
    return st.one_of(posts, posts, gets, cancel, upload, raw)


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


@pytest.mark.slow
def test_fuzz_every_endpoint(make_app):
    from urllib.parse import quote

    from fastapi.testclient import TestClient

    app = make_app()
    with TestClient(app, base_url="http://127.0.0.1", headers={"X-Medsa": "1"},
                    raise_server_exceptions=False) as c:  # fmt: skip
        ids = [c.post("/api/open", json={"root": 0, "path": p}).json()["id"]
               for p in ("rgb.png", "sub/vol.nii.gz")]  # fmt: skip
        c.post("/api/predict", json={"image": ids[1], "slice": 2, "points": [[5, 5, 1]]})
        rss0 = _rss_mb()
        peak = [rss0]

        @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(requests(ids))
        def check(req):
            kind, target, payload = req
            if kind == "POST" and target.endswith("/cancel"):
                r = c.post(quote(target, safe="/"), content=json.dumps(payload))
            elif kind == "POST":
                # json.dumps writes NaN / Infinity, which Python's JSON parser (the server's) reads
                r = c.post(target, content=json.dumps(payload), headers=JSON_HEADERS)
            elif kind == "GET":
                r = c.get(quote(target, safe="/"), params=payload)
            elif kind == "UPLOAD":
                r = c.post("/api/upload", params={"filename": target}, content=payload)
            else:
                r = c.post(target, content=payload, headers=JSON_HEADERS)
            assert r.status_code < 500, (req, r.status_code, r.text[:500])
            if r.status_code >= 400:
                assert isinstance(r.json().get("error"), str), r.text[:200]
            peak[0] = max(peak[0], _rss_mb())

        check()
        assert c.get("/api/info").status_code == 200  # still up
        r = c.post("/api/predict", json={"image": ids[0], "points": [[10, 10, 1]]})
        assert r.status_code == 200
    assert peak[0] - rss0 < RSS_BOUND_MB, (rss0, peak[0])

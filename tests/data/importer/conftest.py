"""Hand-written impressions tables (long, wide, candidates) and their mapping.

Four requests; r1 and r2 are in the training split (``fold`` column), r3 in test, r4 in
validation::

    r1  2024-01-01T00:00:00  u1  shown b (pos 1), a (pos 2), c (pos 3); not shown x
    r2  2024-01-01 00:05:00  u2  shown b (pos 1), d (pos 2)
    r3  2024-01-02T00:00:00Z u1  shown e (pos 1); not shown a, b
    r4  2024-01-01T12:00:00  u3  shown f (pos 1)

Line numbers of the long CSV: header 1, r1 lines 2-4, r2 lines 5-6, r3 line 7, r4 line 8.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

LONG_CSV = """\
rid,ts,uid,iid,pos,score,clk,dwell,cat,color,price,age,device,fold
r1,2024-01-01T00:00:00,u1,a,2,0.9,1,3.5,c1,red,10,30,mobile,train
r1,2024-01-01T00:00:00,u1,b,1,0.5,0,0,c2,blue,,30,mobile,train
r1,2024-01-01T00:00:00,u1,c,3,0.7,0,0,c1,blue,5,30,mobile,train
r2,2024-01-01 00:05:00,u2,b,1,0.8,1,2,c2,blue,20,40,desktop,train
r2,2024-01-01 00:05:00,u2,d,2,0.95,0,0,c3,green,7,40,desktop,train
r3,2024-01-02T00:00:00Z,u1,e,1,0.3,1,1,c4,red,1,30,tablet,test
r4,2024-01-01T12:00:00,u3,f,1,0.5,0,0,c1,red,2,50,mobile,valid
"""

CANDIDATES_CSV = """\
rid,iid,score,cat,color,price
r1,x,0.8,c3,green,3
r3,a,0.6,c1,red,10
r3,b,0.1,c2,blue,20
"""

# The same requests, one row per request; list cells in display order, split at ";".
WIDE_CSV = """\
rid,ts,uid,iids,scores,clks,dwells,cats,colors,prices,age,device,fold
r1,2024-01-01T00:00:00,u1,b;a;c,0.5;0.9;0.7,0;1;0,0;3.5;0,c2;c1;c1,blue;red;blue,;10;5,30,mobile,train
r2,2024-01-01 00:05:00,u2,b;d,0.8;0.95,1;0,2;0,c2;c3,blue;green,20;7,40,desktop,train
r3,2024-01-02T00:00:00Z,u1,e,0.3,1,1,c4,red,1,30,tablet,test
r4,2024-01-01T12:00:00,u3,f,0.5,0,0,c1,red,2,50,mobile,valid
"""

MAPPING: dict[str, Any] = {
    "source": "handwritten",
    "position_base": 1,
    "columns": {
        "request_id": "rid", "time": "ts", "user_id": "uid", "item_id": "iid",
        "position": "pos", "upstream_score": "score", "category": "cat",
    },
    "signals": {
        "click": {"column": "clk", "kind": "binary"},
        "dwell": {"column": "dwell", "kind": "nonnegative", "gain": 0.5},
    },
    "features": {
        "item": {
            "color": {"column": "color", "kind": "categorical"},
            "price": {"column": "price", "kind": "dense", "fill": -1.0},
        },
        "user": {"age": {"column": "age", "kind": "dense"}},
        "context": {"device": {"column": "device", "kind": "categorical"}},
    },
    "split": {"method": "column", "column": "fold"},
}

MAPPING_TOML = """\
source = "handwritten"
position_base = 1

[columns]
request_id = "rid"
time = "ts"
user_id = "uid"
item_id = "iid"
position = "pos"
upstream_score = "score"
category = "cat"

[signals]
click = {column = "clk", kind = "binary"}
dwell = {column = "dwell", kind = "nonnegative", gain = 0.5}

[features.item]
color = {column = "color", kind = "categorical"}
price = {column = "price", kind = "dense", fill = -1.0}

[features.user]
age = {column = "age", kind = "dense"}

[features.context]
device = {column = "device", kind = "categorical"}

[split]
method = "column"
column = "fold"
"""


def wide_mapping() -> dict[str, Any]:
    m = copy.deepcopy(MAPPING)
    m["layout"] = "wide"
    del m["position_base"]
    cols = m["columns"]
    del cols["position"]
    cols.update(item_id="iids", upstream_score="scores", category="cats")
    m["signals"]["click"]["column"] = "clks"
    m["signals"]["dwell"]["column"] = "dwells"
    m["features"]["item"]["color"]["column"] = "colors"
    m["features"]["item"]["price"]["column"] = "prices"
    # The candidates table (long) names its columns apart.
    m["candidates"] = {"columns": {"iids": "iid", "scores": "score", "cats": "cat",
                                   "colors": "color", "prices": "price"}}
    return m


def mapping(**changes: Any) -> dict[str, Any]:
    """A copy of MAPPING with top-level keys replaced."""
    m = copy.deepcopy(MAPPING)
    m.update(changes)
    return m


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for name, text in (("long.csv", LONG_CSV), ("cand.csv", CANDIDATES_CSV),
                       ("wide.csv", WIDE_CSV), ("mapping.toml", MAPPING_TOML)):
        out[name] = tmp_path / name
        out[name].write_text(text)
    return out

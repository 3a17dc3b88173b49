"""The crash soak (tests/soak.py) at CI's size, in both delivery modes: about 300 jobs through two workers that are
SIGKILLed every 15 s, a broker stopped for 10 s while a restarted worker loads, and a SIGTERM under load at the
end. Nothing is lost; exactly-once answers nothing twice."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import ROOT

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("delivery", ["at_least_once", "exactly_once"])
def test_the_soak_loses_nothing_through_kills_and_a_broker_stop(
    delivery: str, tmp_path: Path, tiny_model_dir: Path
) -> None:
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.soak",
            "--jobs=300",
            "--rate=4",
            "--kill-every=15",
            "--broker-down-s=10",
            f"--delivery={delivery}",
            f"--model-dir={tiny_model_dir}",
            f"--work-dir={tmp_path}",
            "--json",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode in (0, 1), run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    print(report)
    assert report["jobs_sent"] + report["malformed_sent"] == 300
    assert report["kills"] >= 4
    assert report["broker_stops"] == 1
    assert report["lost"] == 0, run.stderr[-3000:]
    assert report["wrong"] == []
    assert report["results"] == report["jobs_sent"]
    assert report["dead_letters"] == report["malformed_sent"]
    assert report["max_duplicate_score_diff"] <= 5e-6  # a job scored in other packs rounds differently, no more
    if delivery == "exactly_once":
        assert report["duplicates"] == 0  # read_committed: a crash's open transaction is never seen
    assert run.returncode == 0

"""A researcher server that dies mid-wave is restarted and its rollouts play again: infra, not
the researcher's fault, and no rollout is lost."""

from __future__ import annotations

import anyio
import pyarrow.parquet as pq

from tests.scripted_researcher import DIE, ScriptedResearcher
from tests.wave_child import SleepEnv, plans, seed, wave


def test_dead_server_is_revived_and_the_wave_completes(tmp_path):
    first = ScriptedResearcher({seed(0): [DIE], seed(1): plans(2)[seed(1)]})
    first.__enter__()
    port = int(first.base_url.rsplit(":", 1)[1])
    revived: list[ScriptedResearcher] = []

    async def revive() -> None:
        if not revived:  # many rollouts report the same death; one restart answers them all
            revived.append(ScriptedResearcher(plans(2), port=port).__enter__())

    try:
        out = anyio.run(lambda: wave(tmp_path / "run", first.base_url, SleepEnv(tmp_path / "launches", 0.05), 2, 2,
                                     revive=revive))
        rows = pq.read_table(out).to_pylist()
        assert [r["status"] for r in rows] == ["success", "success"]
        assert [r["val_bpb"] for r in rows] == [1.01, 1.02]
        assert len(revived) == 1 and revived[0].requests, "the restarted server answered the replayed rollouts"
    finally:
        first.kill()
        for r in revived:
            r.kill()

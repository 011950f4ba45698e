"""`ralign bench scale`: sampler throughput on a multi-node Ray cluster simulated on this machine.

`ray.cluster_utils.Cluster` starts a head and worker nodes as separate raylets on loopback; each node advertises
`cpus_per_node` logical CPUs and a custom resource `sampler_slot`, so every sampler actor lands on its own node the
way it would on a real cluster. For 1, 2, 4, ... sampler actors (same policy, one torch thread each) it measures
the samples/s of all samplers generating full chains at once, and the cost of one weight broadcast (adapter-only
state, one object-store copy shared by all samplers). On a machine with fewer cores than samplers the nodes share
cores: throughput stops growing at the core count, which is the measured point where scaling ends here.
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path

log = logging.getLogger(__name__)


def run(config: str | Path, counts: list[int], requests_per_sampler: int = 4, overrides: list[str] | None = None,
        cpus_per_node: int = 1) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    from actors.common import weights_for_transfer
    from actors.rollout import SamplerActor
    from jobs.bench.common import machine
    from ralign.config import UserError, load_config
    from ralign.diffusion.policy import build_policy
    from ralign.rollout.schedule import RolloutRequest
    from ralign.training.config import TrainConfig

    if not counts or min(counts) < 1:
        raise UserError("--samplers needs positive counts, e.g. 1,2,4")
    cfg = load_config(TrainConfig, config, overrides or [])
    spec = cfg.policy_spec()
    n = cfg.ray.request_batch
    nodes = max(counts)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    rows = []
    try:
        for _ in range(nodes):
            cluster.add_node(num_cpus=cpus_per_node, resources={"sampler_slot": 1})
        cluster.wait_for_nodes()
        state = build_policy(spec).trainable_state()  # what the learner broadcasts: adapters only
        ray.init(address=cluster.address, runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
        for count in counts:
            samplers = [SamplerActor.options(num_cpus=cpus_per_node, resources={"sampler_slot": 1}).remote(spec, 1) for _ in range(count)]
            ray.get([s.version.remote() for s in samplers])  # models loaded
            # warm-up: one request each
            ray.get([s.rollout.remote(RolloutRequest([0] * n, ["a red circle"] * n, list(range(n)))) for s in samplers])
            start = time.perf_counter()
            refs = [s.rollout.remote(RolloutRequest(list(range(n)), ["a red circle to the left of a blue square"] * n,
                                                     [r * n + i for i in range(n)]))
                    for r in range(requests_per_sampler) for s in samplers]
            ray.get(refs)
            wall = time.perf_counter() - start
            broadcast = []
            for version in range(1, 6):
                t0 = time.perf_counter()
                ref = ray.put(weights_for_transfer(state))  # as the learner publishes them
                ray.get([s.set_weights.remote(ref, version) for s in samplers])
                broadcast.append(time.perf_counter() - t0)
            samples = count * requests_per_sampler * n
            rows.append({"samplers": count, "samples": samples, "wall_s": round(wall, 3), "samples_per_s": samples / wall,
                         "weight_broadcast_s": statistics.median(broadcast),
                         "weights_mb": sum(t.numel() * t.element_size() for t in state.values()) / 2**20})
            log.info("bench scale: %d sampler(s): %.2f samples/s, weight broadcast %.3fs", count, samples / wall, rows[-1]["weight_broadcast_s"])
            for s in samplers:
                ray.kill(s)
    finally:
        ray.shutdown()
        cluster.shutdown()
    base = rows[0]["samples_per_s"]
    for row in rows:
        row["speedup"] = row["samples_per_s"] / base
        row["efficiency"] = row["speedup"] / (row["samplers"] / rows[0]["samplers"])
    best = max(rows, key=lambda r: r["samples_per_s"])
    return {"benchmark": "scale", "machine": machine(), "config": str(config), "overrides": list(overrides or []),
            "nodes": nodes, "cpus_per_node": cpus_per_node, "samples_per_request": n, "requests_per_sampler": requests_per_sampler,
            "rows": rows, "scaling_stops_at_samplers": best["samplers"]}

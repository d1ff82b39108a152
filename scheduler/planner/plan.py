"""`pdserve plan`: how many prefill and decode workers a workload needs to meet its SLOs.

DistServe's placement search (../shared/TECHNIQUES.md), over the simulator
(scheduler/planner/simulator.py) timed by a profile:
1. The tensor-parallel degree per phase is the smallest power of two whose share of the
   weights leaves room for KV on each device (1 for a profile without memory figures).
2. One prefill instance alone (one-token requests: TTFT judged, the KV transfer at the
   given bandwidth counted in full), one decode instance fed by enough prefill instances
   that they never queue (both SLOs judged: waiting for a decode slot delays the first
   token) and one colocated instance (both judged; under each prefill schedule of
   COLOCATED_SCHEDULES, the best kept) are simulated on the workload's lengths
   with Poisson arrivals, at least `min_duration_s` of them; the highest rate at which
   `attainment` of requests meet their SLOs is bisected between 0 and twice the instance's
   analytic capacity (`capacity`), and a simulation stops as soon as its verdict is certain
   (too many requests missed an SLO, or it kept pace and enough met them). The searches run
   side by side in processes as their inputs come (scheduler/planner/search.py); a slower
   KV link's are capped by the fastest link's goodputs.
3. For N devices, the prefill:decode split maximising min(p * goodput_p, d * goodput_d) is
   chosen, either within each node (KV over NVLink, the unit replicated per node) or across
   the cluster (KV over the inter-node network), whichever carries more.
4. For the requested rate: ceil(rate / goodput) instances of each phase, checked by
   simulating that deployment whole when it is small enough (up to 16 instances).
Per-device goodput is the rate a configuration carries divided by its devices.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from bench.arrivals import arrival_times
from bench.datasets import WORKLOADS
from bench.metrics import SLO, summarize
from scheduler.planner.latency import Fit, LatencyModel, Profile
from scheduler.planner.search import Search, Searches
from scheduler.planner.simulator import SimConfig, SimRequest, Simulator, StopEarly

FULL_CHECK_MAX_INSTANCES = 16
# the prefill schedules a colocated instance is simulated under (--prefill-schedule, --token-budget)
COLOCATED_SCHEDULES = {"whole": ("whole", None), "chunked": ("chunked", None), "chunked-512": ("chunked", 512),
                       "layered": ("layered", None)}


@dataclass(frozen=True)
class PlanConfig:
    slo_ttft_s: float
    slo_tpot_s: float
    workload: str = "chatbot"
    rate: float = 1.0  # requests per second the deployment must carry
    gpus: int = 8
    gpus_per_node: int = 8
    interconnect_gbps: float = 400.0  # between nodes, per device (e.g. one 400 Gb/s NIC per GPU)
    attainment: float = 0.9
    num_requests: int = 400  # at least; more when the rate is high (min_duration_s of arrivals)
    min_duration_s: float = 30.0
    input_len: float | None = None  # move the workload's mean lengths (keeps the spread)
    output_len: float | None = None
    max_model_len: int = 8192
    seed: int = 0


@dataclass(frozen=True)
class Goodput:
    prefill: float  # requests/s one prefill instance carries within the TTFT SLO
    decode: float
    colocated: float  # under its best schedule
    colocated_schedule: str = "chunked"
    colocated_by_schedule: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Placement:
    devices: int
    prefill: int  # instances
    decode: int
    rate: float  # requests/s the split carries
    per_node: bool  # pairs placed within nodes (KV over NVLink)

    @property
    def per_device(self) -> float:
        return self.rate / self.devices


def workload_requests(config: PlanConfig, rate: float, num: int | None = None) -> list[SimRequest]:
    """The workload's lengths (bench's distributions) with Poisson arrivals at rate."""
    workload, rng = WORKLOADS[config.workload], random.Random(config.seed)
    num = max(num or config.num_requests, math.ceil(rate * config.min_duration_s))
    out = []
    for t in arrival_times(num, rate, seed=config.seed):
        prompt = workload.input.sample(rng, config.input_len)
        output = workload.output.sample(rng, config.output_len)
        prompt = min(prompt, config.max_model_len - 1)
        out.append(SimRequest(t, prompt, max(1, min(output, config.max_model_len - prompt))))
    return out


def keeps_up(requests: list[SimRequest], records: list, share: float = 0.8) -> bool:
    """Whether the deployment keeps pace: in the second half of the arrivals it emits at least
    `share` of the tokens that the requests arriving then ask for (in a steady state, tokens
    of earlier requests emitted then make up for later ones emitted after). A finite run of an
    overloaded deployment could otherwise meet the SLOs by luck of its short horizon."""
    end = requests[-1].arrival_s
    asked = sum(r.output_len for r in requests if r.arrival_s >= end / 2)
    emitted = sum(1 for r in records for t in r.chunk_s if end / 2 <= t <= end)
    return emitted >= share * asked


def tensor_parallel(profile: Profile, gpus_per_node: int) -> int:
    if not profile.device_memory_bytes or not profile.weight_bytes:
        return 1
    tp = 1
    while profile.weight_bytes / tp > 0.7 * profile.device_memory_bytes:
        tp *= 2
        if tp > gpus_per_node:
            raise ValueError(f"{profile.model} does not fit on one node of {gpus_per_node} devices")
    return tp


def scaled(latency: LatencyModel, tp: int) -> LatencyModel:
    """The model at tensor-parallel degree tp: per-token and per-request work divides by tp,
    the fixed cost does not (a first-order estimate; profile each degree for better)."""
    if tp == 1:
        return latency
    div = lambda f: Fit((f.coef[0], f.coef[1] / tp, f.coef[2] / tp), f.r2, f.num_points)  # noqa: E731
    return LatencyModel(div(latency.prefill), div(latency.decode_small), div(latency.decode_large),
                        latency.large_batch_from)


class Planner:
    def __init__(self, profile: Profile, config: PlanConfig):
        self.profile, self.config = profile, config
        self.tp = tensor_parallel(profile, config.gpus_per_node)
        self.latency = scaled(profile.latency, self.tp)
        kv_room = (profile.device_memory_bytes * self.tp * 0.9 - profile.weight_bytes
                   if profile.device_memory_bytes else 0)
        blocks = int(kv_room // (profile.kv_bytes_per_token * profile.block_size)) if kv_room > 0 else 0
        self.sim = SimConfig(num_blocks=blocks or profile.num_kv_blocks or 4096, block_size=profile.block_size,
                             max_num_seqs=profile.max_num_seqs or 64,
                             max_num_batched_tokens=profile.max_num_batched_tokens or 2048,
                             max_model_len=config.max_model_len, num_layers=profile.num_layers or 32)
        self.slo = SLO(ttft_ms=config.slo_ttft_s * 1000, tpot_ms=config.slo_tpot_s * 1000)

    def transfer_s_per_token(self, gbps: float | None) -> float:
        return self.profile.transfer_s_per_token(gbps) if gbps else 0.0

    def attainment(self, kind: str, rate: float, transfer_gbps: float | None = None,
                   prefill_goodput: float = 0.0, schedule: str = "chunked", early: bool = False) -> float:
        """Attainment of one instance of kind (prefill, decode, colocated under schedule) at rate.
        early: the simulation stops once it is certain whether the attainment target is met
        (then 0.0 for a miss, a lower bound at or above the target for a pass)."""
        requests, sim = workload_requests(self.config, rate), self.sim
        transfer = self.transfer_s_per_token(transfer_gbps)
        if kind == "prefill":  # one-token requests: TTFT only, the transfer counted in full
            requests = [SimRequest(r.arrival_s, r.prompt_len, 1) for r in requests]
            # room for every admitted prompt at once: a prefill instance never waits for blocks
            room = sim.max_num_seqs * -(-self.config.max_model_len // sim.block_size)
            sim = replace(sim, transfer_s_per_token=transfer, num_blocks=max(sim.num_blocks, room))
        elif kind == "decode":  # enough prefill instances that prompts never queue for one
            sim = replace(sim, num_prefill=max(1, math.ceil(2 * rate / prefill_goodput)), transfer_s_per_token=transfer)
        else:
            sim = self._colocated(schedule)
        simulator = Simulator(self.latency, sim)
        if early:
            stop = StopEarly(self.slo.ttft_ms, self.slo.tpot_ms, self.config.attainment,
                             lambda records: keeps_up(requests, records), requests[-1].arrival_s)
            simulator.run(requests, stop)
            if simulator.verdict is not None:  # a lower bound of the attainment when it passed
                return simulator.num_met / len(requests) if simulator.verdict else 0.0
            records = simulator.records
        else:
            records = simulator.run(requests)
        if not keeps_up(requests, records):
            return 0.0
        return summarize(records, requests[-1].arrival_s, self.slo).attainment

    def capacity(self, s: Search) -> float:
        """An estimate of the requests/s one instance of the search's kind completes, from the
        latency model alone: prompts packed into full steps, decodes at the largest batch the
        slots and KV allow at the mean lengths. The search brackets twice it, and doubles on
        where that still meets the SLOs."""
        sample = workload_requests(self.config, 1.0)
        prompt = sum(r.prompt_len for r in sample) / len(sample)
        output = sum(r.output_len for r in sample) / len(sample)
        lat, sim = self.latency, self.sim
        per_step = max(1, int(sim.max_num_batched_tokens // prompt))
        prefill_rps = per_step / max(lat.prefill_s([int(prompt)] * per_step), 1e-9)
        if s.kind == "prefill":
            return prefill_rps
        batch = int(max(1, min(sim.max_num_seqs, sim.num_blocks * sim.block_size // (prompt + output))))
        decode_rps = batch / max(lat.decode_s([int(prompt + output / 2)] * batch), 1e-9) / max(output, 1.0)
        if s.kind == "decode":
            return decode_rps
        return 1 / (1 / prefill_rps + 1 / decode_rps)

    def search(self, s: Search, tick: Callable[[], None] = lambda: None) -> float:
        """The goodput of one instance for a search (calls tick once per simulation)."""
        target = self.config.attainment

        def meets(rate: float) -> bool:
            tick()
            return self.attainment(s.kind, rate, s.gbps, s.prefill_goodput, s.schedule, early=True) >= target
        if s.cap is not None:  # known not to exceed the cap: at it, or bisected below it
            if s.cap <= 0 or meets(s.cap):
                return max(s.cap, 0.0)
            return self.bisect(meets, 0.0, s.cap)
        return self.max_rate(meets, hi=2 * self.capacity(s))

    def max_rate(self, meets: Callable[[float], bool], iterations: int = 7, hi: float = 0.5) -> float:
        """The highest rate that meets: hi doubles while it meets, then the range below it is
        bisected."""
        lo = 0.0
        while meets(hi):
            lo, hi = hi, hi * 2
            if hi > 1e5:
                return lo
        return self.bisect(meets, lo, hi, iterations)

    @staticmethod
    def bisect(meets: Callable[[float], bool], lo: float, hi: float, iterations: int = 7) -> float:
        """The highest rate found to meet in [lo, hi), lo meeting and hi not."""
        for _ in range(iterations):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if meets(mid) else (lo, mid)
        return lo

    def goodputs(self, links: Sequence[float | None], searches: Searches) -> dict[float | None, Goodput]:
        """One instance's goodput per kind over each KV link (colocated, which has none, once).
        The fastest link is searched first; a slower link carries at most what it does, so
        its searches are capped by those results (one simulation when it carries as much)."""
        links = sorted(dict.fromkeys(links), key=lambda g: -math.inf if g is None else -g)
        fastest, found, started = links[0], {}, set()

        def follow(done: Search, goodput: float) -> list[Search]:
            found[done.kind, done.gbps] = goodput
            ready = []
            if done.kind == "prefill" and done.gbps == fastest:
                ready += [Search("prefill", g, cap=goodput) for g in links[1:]]
            for g in links:  # a decode search once its link's prefill goodput (and the fastest decode's) is known
                prefill = found.get(("prefill", g))
                if prefill is None or g in started or (g != fastest and ("decode", fastest) not in found):
                    continue
                started.add(g)
                if prefill > 0:
                    ready.append(Search("decode", g, prefill_goodput=prefill,
                                        cap=None if g == fastest else found["decode", fastest]))
                else:  # no prefill instance to feed decode
                    found["decode", g] = 0.0
            return ready
        results = searches.run([Search("prefill", fastest)] + [Search("colocated", schedule=n) for n in COLOCATED_SCHEDULES],
                               follow)
        by_schedule = {name: results[Search("colocated", schedule=name)] for name in COLOCATED_SCHEDULES}
        rate = {(s.kind, s.gbps): r for s, r in results.items()}
        best = max(by_schedule, key=lambda name: (by_schedule[name], name == "chunked"))
        return {g: Goodput(rate["prefill", g], rate.get(("decode", g), 0.0), by_schedule[best], best, by_schedule)
                for g in links}

    def goodput(self, transfer_gbps: float | None) -> Goodput:
        """goodputs for one link, in this process."""
        with Searches(self, 1) as searches:
            return self.goodputs([transfer_gbps], searches)[transfer_gbps]

    def _colocated(self, schedule: str, instances: int = 1) -> SimConfig:
        name, budget = COLOCATED_SCHEDULES[schedule]
        return replace(self.sim, colocated=True, num_decode=instances, prefill_schedule=name, token_budget=budget)

    def best_split(self, devices: int, g: Goodput, per_node: bool) -> Placement:
        slots = devices // self.tp
        best = Placement(devices, 0, 0, 0.0, per_node)
        for p in range(1, slots):
            d = slots - p
            rate = min(p * g.prefill, d * g.decode)
            if rate > best.rate:
                best = Placement(devices, p, d, rate, per_node)
        return best

    def placement(self, devices: int, intra: Goodput, inter: Goodput) -> Placement:
        """The best disaggregated split of `devices`: within nodes (replicated) or across."""
        node = self.config.gpus_per_node
        if devices <= node:
            return self.best_split(devices, intra, True)
        unit = self.best_split(node, intra, True)
        nodes = devices // node
        within = Placement(devices, unit.prefill * nodes, unit.decode * nodes, unit.rate * nodes, True)
        across = self.best_split(devices, inter, False)
        return within if within.rate >= across.rate else across

    def check(self, prefill: int, decode: int, rate: float, transfer_gbps: float | None) -> float | None:
        """Attainment of the whole disaggregated deployment at rate (None when too large to simulate)."""
        return self._whole(replace(self.sim, num_prefill=prefill, num_decode=decode,
                                   transfer_s_per_token=self.transfer_s_per_token(transfer_gbps)), rate)

    def colocated_check(self, instances: int, rate: float, schedule: str = "chunked") -> float | None:
        return self._whole(self._colocated(schedule, instances), rate)

    def _whole(self, sim: SimConfig, rate: float) -> float | None:
        instances = sim.num_decode + (0 if sim.colocated else sim.num_prefill)
        if instances > FULL_CHECK_MAX_INSTANCES:
            return None
        requests = workload_requests(self.config, rate, max(self.config.num_requests, 100 * instances))
        return summarize(Simulator(self.latency, sim).run(requests), requests[-1].arrival_s, self.slo).attainment

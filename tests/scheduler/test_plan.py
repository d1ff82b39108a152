"""`pdserve plan` on a synthetic latency model with known answers, and the CLI on the shipped
profiles (short simulations)."""

import json

import pytest

from scheduler.planner.cli import PROFILES, load_profile, main
from scheduler.planner.latency import Fit, LatencyModel, Profile
from scheduler.planner.plan import Goodput, PlanConfig, Planner, keeps_up, tensor_parallel
from scheduler.planner.simulator import SimRequest

MODEL = LatencyModel(Fit((0.010, 0.001, 0.0), 1.0, 10), Fit((0.005, 0.0, 0.001), 1.0, 10),
                     Fit((0.005, 0.0, 0.001), 1.0, 10), 1000)


def profile(**extra) -> Profile:
    return Profile("synthetic", "cpu", "float32", 1, 16, 1000, (), (), MODEL, **extra)


def test_the_best_split_balances_the_two_pools():
    planner = Planner(profile(), PlanConfig(1.0, 0.1))
    g = Goodput(prefill=3.0, decode=1.0, colocated=0.5)
    best = planner.best_split(8, g, True)
    assert (best.prefill, best.decode, best.rate) == (2, 6, 6.0)  # min(2 x 3, 6 x 1)
    assert best.per_device == 0.75
    # 16 devices in nodes of 8: 2P6D per node beats nothing across, as the rates tie
    planner = Planner(profile(), PlanConfig(1.0, 0.1, gpus_per_node=8))
    placed = planner.placement(16, g, g)
    assert (placed.prefill, placed.decode, placed.rate, placed.per_node) == (4, 12, 12.0, True)
    # a slow network makes the within-node split win outright
    slow = Goodput(prefill=1.0, decode=1.0, colocated=0.5)
    assert planner.placement(16, g, slow).per_node


def test_tensor_parallel_is_the_smallest_power_of_two_that_leaves_room_for_kv():
    assert tensor_parallel(profile(), 8) == 1  # no memory figures
    assert tensor_parallel(profile(device_memory_bytes=80 * 10**9, weight_bytes=16 * 10**9), 8) == 1
    assert tensor_parallel(profile(device_memory_bytes=80 * 10**9, weight_bytes=140 * 10**9), 8) == 4
    with pytest.raises(ValueError, match="does not fit"):
        tensor_parallel(profile(device_memory_bytes=80 * 10**9, weight_bytes=900 * 10**9), 8)


def test_a_deployment_that_falls_behind_does_not_keep_up():
    from bench.metrics import RequestRecord
    requests = [SimRequest(float(t), 10, 4) for t in range(1, 11)]  # 4 tokens a second asked
    on_time = [RequestRecord(send_s=r.arrival_s, chunk_s=[r.arrival_s + 0.1 * i for i in range(4)])
               for r in requests]
    assert keeps_up(requests, on_time)
    late = [RequestRecord(send_s=r.arrival_s, chunk_s=[r.arrival_s * 2 + i for i in range(4)]) for r in requests]
    assert not keeps_up(requests, late)


def test_one_instance_goodput_on_the_synthetic_model():
    # prefill 10 ms + 1 ms per token on prompts of 100 tokens on average: one instance computes
    # at most ~10 prompts a second (batched, the 10 ms is shared); a 0.5 s TTFT SLO holds below that
    planner = Planner(profile(), PlanConfig(0.5, 0.1, input_len=100, output_len=4, num_requests=100,
                                            min_duration_s=10))
    rate = planner.max_rate(lambda r: planner.attainment("prefill", r) >= 0.9, iterations=5)
    assert 2.0 < rate < 20.0
    assert planner.attainment("prefill", rate / 2) >= 0.9


def test_plan_cli_prints_flags_and_helm_values(tmp_path, capsys):
    out = tmp_path / "plan.json"
    code = main(["--profile", "smollm2-135m-cpu-2core", "--slo-ttft-ms", "2000", "--slo-tpot-ms", "200",
                 "--workload", "chatbot", "--input-len", "64", "--output-len", "16", "--rate", "0.5", "--gpus", "4",
                 "--num-requests", "30", "--min-duration-s", "5", "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    rec = result["recommended"]
    assert f"--prefill-workers {rec['prefill_workers']} --decode-workers {rec['decode_workers']}" in printed
    assert f"prefill.replicas={rec['prefill_workers']},decode.replicas={rec['decode_workers']}" in printed
    assert "gpusPerPod" not in printed  # a CPU profile
    assert result["goodput_per_instance"]["prefill"] > 0 and result["per_gpu_goodput"]["4"]["colocated"] > 0
    assert main(["--profile", "nope", "--slo-ttft-ms", "1", "--slo-tpot-ms", "1", "--rate", "1", "--gpus", "2"]) == 2


def test_shipped_profiles_load_and_document_their_source():
    names = sorted(p.stem for p in PROFILES.glob("*.json"))
    assert names == ["llama-8b-h100-derived", "smollm2-135m-cpu-1thread", "smollm2-135m-cpu-2core"]
    gpu = load_profile("llama-8b-h100-derived")
    assert gpu.kv_bytes_per_token == 131072 and gpu.transfer_gbps and {"hardware", "prefill", "decode"} <= gpu.notes.keys()
    for name in ("smollm2-135m-cpu-1thread", "smollm2-135m-cpu-2core"):
        cpu = load_profile(name)
        assert cpu.transfer_gbps and cpu.prefill_samples and cpu.latency.prefill.r2 > 0.9
        assert cpu.latency.decode_small.r2 > 0.9 and cpu.num_kv_blocks > 0 and name in cpu.command


def test_the_planner_chooses_the_colocated_prefill_schedule():
    planner = Planner(profile(num_layers=32), PlanConfig(2.0, 0.02, input_len=600, output_len=16, num_requests=60,
                                                         min_duration_s=5))
    g = planner.goodput(None)
    assert set(g.colocated_by_schedule) == {"whole", "chunked", "chunked-512", "layered"}
    assert g.colocated == max(g.colocated_by_schedule.values()) == g.colocated_by_schedule[g.colocated_schedule]
    # a strict TPOT (20 ms against 5 ms + 1 ms per request decodes) rules out whole prompts beside decodes
    assert g.colocated_by_schedule["whole"] <= g.colocated


def test_slos_no_instance_can_meet_are_refused_with_a_message(capsys):
    assert main(["--profile", "smollm2-135m-cpu-2core", "--slo-ttft-ms", "1", "--slo-tpot-ms", "200", "--rate", "1",
                 "--gpus", "2", "--input-len", "64", "--output-len", "8", "--num-requests", "20",
                 "--min-duration-s", "2"]) == 2
    assert "one prefill instance cannot meet the SLOs" in capsys.readouterr().err

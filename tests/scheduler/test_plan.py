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


def test_a_model_too_large_for_one_device_is_planned_tensor_parallel_and_printed_so(tmp_path, capsys):
    """A CPU profile whose weights take 1.2x a device's memory: two ranks per worker, and the
    printed command and Helm values say so."""
    raw = json.loads((PROFILES / "smollm2-135m-cpu-2core.json").read_text())
    raw.update(device_memory_bytes=10**9, weight_bytes=12 * 10**8)
    path = tmp_path / "big.json"
    path.write_text(json.dumps(raw))
    code = main(["--profile", str(path), "--slo-ttft-ms", "2000", "--slo-tpot-ms", "200", "--input-len", "64",
                 "--output-len", "16", "--rate", "0.5", "--gpus", "8", "--num-requests", "30", "--min-duration-s", "5"])
    printed = capsys.readouterr().out
    assert code == 0 and "--prefill-tp 2 --decode-tp 2" in printed
    assert "prefill.tensorParallelSize=2,decode.tensorParallelSize=2" in printed


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


def test_plans_are_the_same_with_one_job_and_with_several():
    from scheduler.planner.search import Searches
    planner = Planner(profile(num_layers=32), PlanConfig(0.5, 0.05, input_len=100, output_len=8, num_requests=60,
                                                         min_duration_s=5))
    links = [None, 100.0]
    with Searches(planner, 1) as one:
        alone = planner.goodputs(links, one)
    seen = []
    with Searches(planner, 3, lambda sims, done, total: seen.append((sims, done, total))) as pool:
        parallel = planner.goodputs(links, pool)
    assert alone == parallel and alone[None].prefill > 0 and alone[None].decode > 0
    assert pool.num_simulations == one.num_simulations > 0
    assert seen[-1] == (pool.num_simulations, 8, 8)  # 2 prefill + 4 colocated, then 2 decode searches


def test_stopping_early_never_changes_whether_a_rate_meets_the_target():
    planner = Planner(profile(num_layers=32), PlanConfig(0.5, 0.02, input_len=100, output_len=8, num_requests=80,
                                                         min_duration_s=5))
    verdicts = set()
    for kind in ("prefill", "decode", "colocated"):
        for rate in (1.0, 4.0, 8.0, 16.0, 40.0):
            full = planner.attainment(kind, rate, prefill_goodput=20.0)
            early = planner.attainment(kind, rate, prefill_goodput=20.0, early=True)
            assert (full >= 0.9) == (early >= 0.9), (kind, rate, full, early)
            verdicts.add(full >= 0.9)
    assert verdicts == {True, False}  # both sides of the target were tried


def test_the_search_brackets_the_analytic_capacity():
    from scheduler.planner.search import Search
    planner = Planner(profile(num_layers=32), PlanConfig(0.5, 0.05, input_len=100, output_len=8, num_requests=60,
                                                         min_duration_s=5))
    for s in (Search("prefill"), Search("decode", prefill_goodput=50.0), Search("colocated")):
        capacity, goodput = planner.capacity(s), planner.search(s)
        assert 0 < goodput <= capacity * 1.05, (s, goodput, capacity)  # an estimate of the most it can carry


def test_plan_output_off_a_terminal_is_plain_lines(capsys):
    assert main(["--profile", "smollm2-135m-cpu-2core", "--slo-ttft-ms", "2000", "--slo-tpot-ms", "200",
                 "--input-len", "64", "--output-len", "8", "--rate", "0.5", "--gpus", "2", "--num-requests", "20",
                 "--min-duration-s", "2", "--jobs", "2"]) == 0
    printed = capsys.readouterr().out
    assert "goodput searches:" in printed and "simulations in" in printed and "(2 jobs)" in printed
    assert printed.count("simulations") == 1 and "\r" not in printed  # no bar drawn


def test_verify_refuses_a_profile_of_other_hardware(capsys):
    assert main(["--profile", "llama-8b-h100-derived", "--slo-ttft-ms", "2000", "--slo-tpot-ms", "200",
                 "--input-len", "64", "--output-len", "8", "--rate", "1", "--gpus", "2", "--num-requests", "20",
                 "--min-duration-s", "2", "--verify"]) == 2
    assert "a CPU profile" in capsys.readouterr().err


@pytest.mark.slow
def test_verify_serves_the_plan_and_prints_predicted_against_measured(tiny_llama, tmp_path, capsys):
    out = tmp_path / "plan.json"
    code = main(["--profile", "smollm2-135m-cpu-2core", "--slo-ttft-ms", "5000", "--slo-tpot-ms", "1000",
                 "--input-len", "32", "--output-len", "8", "--rate", "0.5", "--gpus", "2", "--num-requests", "20",
                 "--min-duration-s", "2", "--verify", "--verify-requests", "6", "--verify-timeout-s", "240",
                 "--verify-serve-args", f"--model {tiny_llama} --max-model-len 256", "--json", str(out)])
    printed = capsys.readouterr().out
    for row in ("SLO attainment", "p90 TTFT", "p90 TPOT", "predicted against measured at 0.5 req/s"):
        assert row in printed
    verified = json.loads(out.read_text())["verify"]
    # the tiny model's replies are fast but may be lone partial UTF-8 bytes, which bench counts as failed
    assert verified["requests"] == 6 and verified["attainment"]["measured"] >= 0.5
    assert code == (0 if verified["passed"] else 1)
    assert verified["ttft_p90_s"]["predicted"] > 0 and verified["ttft_p90_s"]["measured"] > 0

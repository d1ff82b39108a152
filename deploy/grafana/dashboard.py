"""Builds deploy/grafana/pdserve.json, the pdserve dashboard, with Grafana's own SDK.

    python deploy/grafana/dashboard.py > deploy/grafana/pdserve.json

Rows: SLOs (TTFT and TPOT percentiles against the SLO lines, attainment against its target,
goodput), requests (latency per phase, errors, tokens), pools (queue depths, pending prompt
tokens, KV usage per pool and per worker), KV transfer, worker health. Every query reads
pdserve's /metrics (scheduler/metrics.py); tests/deploy/test_observability.py checks that the file
is current, that each query parses as PromQL and that a live server serves each metric.
"""

from __future__ import annotations

import json

from grafana_foundation_sdk.builders import common, prometheus, stat, statetimeline, timeseries
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import LegendDisplayMode, LegendPlacement, TooltipDisplayMode, VisibilityMode
from grafana_foundation_sdk.models.dashboard import (
    DataSourceRef,
    DynamicConfigValue,
    FieldColorModeId,
    Threshold,
    ThresholdsMode,
)

DS = DataSourceRef(type_val="prometheus", uid="${datasource}")
SEL = 'job=~"$job"'
RATE = "$__rate_interval"


def q(expr: str, legend: str, ref: str = "A") -> prometheus.Dataquery:
    return prometheus.Dataquery().expr(expr).legend_format(legend).datasource(DS).ref_id(ref)


def quantiles(metric: str, by: str = "") -> list[prometheus.Dataquery]:
    group = f"le, {by}" if by else "le"
    return [q(f"histogram_quantile({p}, sum by ({group}) (rate({metric}_bucket{{{SEL}}}[{RATE}])))",
              f"p{int(p * 100)}" + (f" {{{{{by}}}}}" if by else ""), ref)
            for p, ref in ((0.5, "A"), (0.9, "B"), (0.99, "C"))]


def slo_line() -> list[DynamicConfigValue]:
    """A target drawn as a red dashed line."""
    return [DynamicConfigValue(id_val="color", value={"mode": "fixed", "fixedColor": "red"}),
            DynamicConfigValue(id_val="custom.lineStyle", value={"fill": "dash", "dash": [10, 10]})]


def series(title: str, unit: str, targets: list[prometheus.Dataquery], description: str,
           width: int = 12) -> timeseries.Panel:
    panel = (timeseries.Panel().title(title).description(description).unit(unit).datasource(DS).span(width).height(8)
             .legend(common.VizLegendOptions().display_mode(LegendDisplayMode.LIST)
                     .placement(LegendPlacement.BOTTOM).show_legend(True))
             .tooltip(common.VizTooltipOptions().mode(TooltipDisplayMode.MULTI)))
    for i, target in enumerate(targets):
        panel = panel.with_target(target.ref_id(chr(ord("A") + i)))
    return panel


def red_below(value: float) -> db.ThresholdsConfig:
    return db.ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE).steps(
        [Threshold(value=None, color="red"), Threshold(value=value, color="green")])


def big(title: str, target: prometheus.Dataquery, unit: str, width: int, height: int, green_from: float) -> stat.Panel:
    """A single number: the last value, red below green_from."""
    return (stat.Panel().title(title).unit(unit).datasource(DS).span(width).height(height).with_target(target)
            .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"])).thresholds(red_below(green_from))
            .color_scheme(db.FieldColor().mode(FieldColorModeId.THRESHOLDS)))


def with_slo(panel: timeseries.Panel, expr: str, legend: str) -> timeseries.Panel:
    return panel.with_target(q(expr, legend, "SLO")).override_by_name(legend, slo_line())


def build() -> db.Dashboard:
    def attained(window: str) -> str:
        return (f'sum(rate(pdserve_slo_requests_total{{{SEL},result="met"}}[{window}])) '
                f"/ sum(rate(pdserve_slo_requests_total{{{SEL}}}[{window}]))")

    def worker(metric: str) -> str:
        """One series per worker, whichever front door reports it."""
        return f"max by (pool, worker) ({metric}{{{SEL}}})"
    d = (db.Dashboard("pdserve").uid("pdserve-overview").tags(["pdserve", "llm-serving"])
         .description("Disaggregated LLM serving: SLOs, phases, pools, KV transfer, worker health")
         .refresh("30s").time("now-1h", "now").timezone("browser")
         .with_variable(db.DatasourceVariable("datasource").label("Prometheus").type("prometheus"))
         .with_variable(db.QueryVariable("job").label("job").datasource(DS)
                        .query("label_values(pdserve_slo_requests_total, job)")
                        .include_all(True).all_value(".*").multi(True)))

    d = d.with_row(db.Row("SLOs"))
    d = d.with_panel(with_slo(series("TTFT", "s", quantiles("pdserve_request_ttft_seconds"),
                                     "Time to first token, server side, against the TTFT SLO (--slo-ttft-ms)", 8),
                              f"max(pdserve_slo_ttft_seconds{{{SEL}}})", "SLO"))
    d = d.with_panel(with_slo(series("TPOT", "s", quantiles("pdserve_request_tpot_seconds"),
                                     "Mean time per output token after the first, per request, against the TPOT SLO",
                                     8), f"max(pdserve_slo_tpot_seconds{{{SEL}}})", "SLO"))
    d = d.with_panel(with_slo(series("SLO attainment", "percentunit",
                                     [q(attained(RATE), "attainment")],
                                     "Share of finished requests that met both SLOs (5xx count as missed), "
                                     "against the target (--slo-attainment-target)", 8).min(0).max(1),
                              f"max(pdserve_slo_attainment_target{{{SEL}}})", "target"))
    d = d.with_panel(big("Attainment over the range", q(attained("$__range"), "attainment"), "percentunit", 6, 5, 0.9))
    d = d.with_panel(series("Goodput", "reqps", [
        q(f'sum(rate(pdserve_slo_requests_total{{{SEL},result="met"}}[{RATE}]))', "goodput (met both SLOs)"),
        q(f"sum(rate(pdserve_slo_requests_total{{{SEL}}}[{RATE}]))", "finished")],
        "Requests per second that met every SLO, against all finished requests", 18).height(5))

    d = d.with_row(db.Row("Requests"))
    d = d.with_panel(series("Latency per phase (mean)", "s", [q(
        f"sum by (phase) (rate(pdserve_request_phase_seconds_sum{{{SEL}}}[{RATE}])) "
        f"/ sum by (phase) (rate(pdserve_request_phase_seconds_count{{{SEL}}}[{RATE}]))", "{{phase}}")],
        "queue, prefill, transfer (KV still landing after the first token), decode_queue (waiting for decode "
        "KV blocks), decode"))
    d = d.with_panel(series("Latency per phase (p90)", "s", quantiles("pdserve_request_phase_seconds", "phase")[1:2],
                            "90th percentile of each phase"))
    d = d.with_panel(series("Errors", "reqps", [q(
        f"sum by (status) (rate(pdserve_requests_rejected_total{{{SEL}}}[{RATE}]))", "{{status}}")],
        "Requests refused (4xx) or failed (5xx; 503: no worker had room)", 8))
    d = d.with_panel(series("Tokens", "short", [
        q(f"sum(rate(pdserve_prompt_tokens_total{{{SEL}}}[{RATE}]))", "prompt tokens/s"),
        q(f"sum(rate(pdserve_generation_tokens_total{{{SEL}}}[{RATE}]))", "generated tokens/s"),
        q(f"sum(rate(pdserve_prefix_cache_hit_tokens_total{{{SEL}}}[{RATE}]))", "prefix-cache hits/s")],
        "Prompt, generated and prefix-cached tokens per second", 8))
    d = d.with_panel(series("Inter-token gap", "s", quantiles("pdserve_request_itl_seconds"),
                            "Gap between consecutive output tokens", 8))

    d = d.with_row(db.Row("Pools"))
    d = d.with_panel(series("Queue depth per pool", "short", [
        q(f"sum by (pool) ({worker('pdserve_worker_waiting_requests')})", "{{pool}} waiting"),
        q(f"sum by (pool) ({worker('pdserve_worker_running_requests')})", "{{pool}} running")],
        "Requests waiting on each pool's workers (decode: for KV blocks) and running in their batches", 8))
    d = d.with_panel(series("Pending prompt tokens", "short", [
        q(worker("pdserve_worker_pending_prefill_tokens"), "{{pool}} {{worker}}")],
        "Prompt tokens queued or being prefilled per worker (what JSQ routes prefill by)", 8))
    d = d.with_panel(series("KV usage per pool", "percentunit", [q(
        f"sum by (pool) ({worker('pdserve_worker_kv_blocks_used')}) "
        f"/ sum by (pool) ({worker('pdserve_worker_kv_blocks_total')})", "{{pool}}")],
        "KV-cache blocks in use over blocks in all, per pool", 8).min(0).max(1))
    d = d.with_panel(series("KV usage per worker", "percentunit", [q(
        f"{worker('pdserve_worker_kv_blocks_used')} / {worker('pdserve_worker_kv_blocks_total')}",
        "{{pool}} {{worker}}")], "KV-cache blocks in use over blocks in all, per worker", 24).min(0).max(1))

    d = d.with_row(db.Row("KV transfer"))
    d = d.with_panel(series("KV transfer rate", "Bps", [
        q(f"sum(rate(pdserve_kv_transfer_bytes_total{{{SEL}}}[{RATE}])) "
          f"/ sum(rate(pdserve_kv_transfer_seconds_sum{{{SEL}}}[{RATE}]))", "bytes/s while a prompt's KV lands"),
        q(f"sum(rate(pdserve_kv_transfer_bytes_total{{{SEL}}}[{RATE}]))", "bytes/s shipped")],
        "Prompt KV shipped from prefill to decode workers. Layer-wise transfer overlaps prefill, so the landing "
        "rate is bounded by the prefill speed as much as by the link"))
    d = d.with_panel(series("KV transfer time", "s", quantiles("pdserve_kv_transfer_seconds")[1:2] + [q(
        f'histogram_quantile(0.9, sum by (le) (rate(pdserve_request_phase_seconds_bucket{{{SEL},phase="transfer"}}'
        f"[{RATE}])))", "p90 exposed (after the first token)")],
        "First to last KV chunk of a prompt landing (overlaps prefill), and what is left after the first token"))

    d = d.with_row(db.Row("Worker health"))
    d = d.with_panel(big("Live workers", q(f"sum by (pool) ({worker('pdserve_worker_up')})", "{{pool}}"),
                         "short", 6, 6, 1))
    d = d.with_panel(statetimeline.Panel().title("Workers up").datasource(DS).span(18).height(6)
                     .description("1: answering the scheduler's polls; 0: missed polls or failed a call "
                                  "(a restarted worker comes back at a new address)")
                     .with_target(q(worker("pdserve_worker_up"), "{{pool}} {{worker}}"))
                     .merge_values(True).show_value(VisibilityMode.NEVER).thresholds(red_below(1))
                     .color_scheme(db.FieldColor().mode(FieldColorModeId.THRESHOLDS)))
    return d


def render() -> str:
    return json.dumps(build().build(), cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    print(render(), end="")

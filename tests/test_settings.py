"""Every service refuses flags it cannot run with at start-up, saying what to change."""

from __future__ import annotations

import pytest

from deploy.cli import up_parser
from gateway.settings import GatewaySettings
from services.scheduler.server import SchedulerSettings
from services.worker.settings import WorkerSettings

SCHEDULER = ["--workers", "127.0.0.1:1", "--redis-url", "redis://127.0.0.1:1/0"]
GATEWAY = ["--redis-url", "redis://127.0.0.1:1/0"]

REFUSED = [
    (SchedulerSettings.from_args, SCHEDULER + ["--max-num-batched-tokens", "0"],
     "--max-num-batched-tokens: must be an integer >= 1, got 0"),
    (SchedulerSettings.from_args, SCHEDULER + ["--max-num-seqs", "-3"], "integer >= 1, got -3"),
    (SchedulerSettings.from_args, SCHEDULER + ["--heartbeat-ttl", "0"], "a number > 0, got 0"),
    (SchedulerSettings.from_args, SCHEDULER + ["--heartbeat-ttl", "nan"], "> 0, got nan"),
    (WorkerSettings.from_args, ["--gpu-memory-utilization", "1.5"], "(0, 1], got 1.5"),
    (WorkerSettings.from_args, ["--block-size", "0"], "--block-size: must be an integer >= 1"),
    (WorkerSettings.from_args, ["--tp-size", "2"], "--tp-size > 1 needs --dist-init"),
    (GatewaySettings.from_args, GATEWAY + ["--max-inflight-requests", "0"], "integer >= 1"),
    (GatewaySettings.from_args, GATEWAY + ["--http-port", "-2"], "integer >= -1, got -2"),
    (up_parser().parse_args, ["--max-num-batched-tokens", "0"], "integer >= 1, got 0"),
    (up_parser().parse_args, ["-tp", "0"], "integer >= 1, got 0"),
]


@pytest.mark.parametrize("parse,argv,message", REFUSED, ids=[" ".join(r[1][-2:]) for r in REFUSED])
def test_a_setting_a_service_cannot_run_with_is_refused_at_start(parse, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse(argv)
    said = capsys.readouterr().err + str(exit_.value.code)
    assert message in said


def test_good_settings_parse():
    assert SchedulerSettings.from_args(SCHEDULER + ["--max-num-batched-tokens", "1"]) \
        .max_num_batched_tokens == 1
    assert WorkerSettings.from_args(["--gpu-memory-utilization", "1"]).gpu_memory_utilization == 1
    assert GatewaySettings.from_args(GATEWAY + ["--http-port", "-1"]).http_port == -1


def test_up_tells_the_workers_how_many_proposals_a_step_verifies():
    from deploy.cli import spec_from_args

    args = up_parser().parse_args(["--model", "tiny", "--speculative-config",
                                   '{"method": "ngram", "num_speculative_tokens": 3}'])
    spec = spec_from_args(args)
    assert "--speculative-config" in spec.scheduler_args
    worker = WorkerSettings.from_args(list(spec.worker_args))
    assert worker.num_speculative_tokens == 3
    assert WorkerSettings.from_args([]).num_speculative_tokens == 0
    with pytest.raises(SystemExit, match="num_speculative_tokens is required"):
        spec_from_args(up_parser().parse_args(["--model", "tiny", "--speculative-config",
                                               '{"method": "ngram"}']))

"""``roadstream run`` sizes itself: the plan from cores and GPUs, ``--workers``, ``device=auto``."""

from __future__ import annotations

from pathlib import Path

import pytest

from stages.devices import resolve_device
from stream.errors import ConfigError
from stream.settings import BrokerSettings, DetectSettings, IngestSettings, Settings
from workers.children import child_envs
from workers.plan import machine_plan, parse_workers, plan_workers
from workers.run import private_redis_args

STAGES = ["ingest", "detect", "fuse"]
VLM_STAGES = ["ingest", "detect", "vera", "vlm", "fuse"]


def test_one_gpu_and_16_cores_put_ingest_on_the_cores_left() -> None:
    # Given 16 cores and one GPU / When planned
    plan = plan_workers(16, 1, STAGES)
    # Then one detect on the GPU, two fuse, and ingest on the rest (fuse and redis share a core)
    assert plan.workers == {"ingest": 14, "detect": 1, "fuse": 2}
    assert plan.detect_devices == ["cuda:0"]
    assert plan.describe() == "plan (16 cores, 1 GPU): ingest=14 detect=1 [cuda:0] fuse=2"


def test_each_gpu_gets_a_detect_worker_of_its_own() -> None:
    # Given 32 cores, two GPUs and a VLM backend / When planned with NVDEC allowed
    plan = plan_workers(32, 2, VLM_STAGES, nvdec=True, pyav_beside_nvdec=True)
    # Then two detect workers on cuda:0 and cuda:1, one vera and one vlm, two NVDEC ingest
    # beside 25 PyAV ones
    assert plan.workers == {"ingest": 27, "detect": 2, "vera": 1, "vlm": 1, "fuse": 2}
    assert plan.detect_devices == ["cuda:0", "cuda:1"]
    assert plan.nvdec_ingest == 2
    assert plan.describe() == ("plan (32 cores, 2 GPUs): ingest=27 (2 nvdec) detect=2 [cuda:0,cuda:1] "
                               "vera=1 vlm=1 fuse=2")  # fmt: skip


def test_with_nvdec_ingest_is_one_nvdec_process_beside_pyav_ones_by_default() -> None:
    # Given 16 cores and one GPU with NVDEC / When planned with the default settings
    plan = machine_plan(Settings(), STAGES, cores=16, gpus=1, nvdec=True)
    # Then one of the fourteen ingest processes decodes with NVDEC, the rest with PyAV
    assert plan.workers == {"ingest": 14, "detect": 1, "fuse": 2} and plan.nvdec_ingest == 1
    # and two NVDEC per GPU on two GPUs when the settings ask, or NVDEC alone when asked
    two = Settings(ingest=IngestSettings(nvdec_processes=2, pyav_beside_nvdec=False))
    assert machine_plan(two, STAGES, cores=16, gpus=2, nvdec=True).workers["ingest"] == 4
    alone = Settings(ingest=IngestSettings(pyav_beside_nvdec=False))
    assert machine_plan(alone, STAGES, cores=16, gpus=1, nvdec=True).workers == {"ingest": 1, "detect": 1, "fuse": 2}
    # and without NVDEC the cores decode as before
    assert machine_plan(Settings(), STAGES, cores=16, gpus=1, nvdec=False).workers["ingest"] == 14


def test_keyframe_sampling_plans_no_nvdec_process() -> None:
    # Given 16 cores and one GPU with NVDEC, sampling keyframes (PyAV decodes only those)
    keyframes = Settings(ingest=IngestSettings(sample="keyframes"))
    plan = machine_plan(keyframes, STAGES, cores=16, gpus=1, nvdec=True)
    # Then all fourteen ingest processes are PyAV ones, one job each
    assert plan.workers == {"ingest": 14, "detect": 1, "fuse": 2} and plan.nvdec_ingest == 0
    ingest_envs = [env for stage, env in child_envs(plan, keyframes) if stage == "ingest"]
    assert len(ingest_envs) == 14
    assert all(env["ROADSTREAM_INGEST__DECODER"] == "pyav" and "ROADSTREAM_WORKER__CONCURRENCY" not in env
               for env in ingest_envs)  # fmt: skip


def test_without_gpus_detect_runs_on_the_cpu_beside_half_the_cores_of_ingest() -> None:
    # Given 8 cores and no GPU / When planned
    plan = plan_workers(8, 0, STAGES)
    # Then ingest on half the cores, one detect on the CPU, no NVDEC
    assert plan.workers == {"ingest": 4, "detect": 1, "fuse": 1}
    assert (plan.detect_devices, plan.nvdec_ingest, plan.single) == (["cpu"], 0, False)


def test_a_small_machine_without_gpus_runs_in_one_process() -> None:
    plan = plan_workers(2, 0, STAGES)
    assert plan.single and plan.workers == {"ingest": 1, "detect": 1, "fuse": 1}
    assert plan.describe() == "plan (2 cores, 0 GPUs): one process, one worker per stage"
    assert not plan_workers(2, 1, STAGES).single


def test_workers_override_the_plan_stage_by_stage() -> None:
    # Given the 16-core, two-GPU plan
    plan = plan_workers(16, 2, STAGES)
    # When --workers names ingest and detect
    changed = parse_workers("ingest=4, detect=4", plan)
    # Then those change, fuse keeps the plan's, and the detect workers take the GPUs in turn
    assert changed.workers == {"ingest": 4, "detect": 4, "fuse": 2}
    assert changed.detect_devices == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assert not changed.single


def test_workers_1_is_the_single_process_mode() -> None:
    plan = parse_workers("1", plan_workers(16, 1, STAGES))
    assert plan.single and plan.workers == {"ingest": 1, "detect": 1, "fuse": 1}
    assert "one process" in plan.describe()


@pytest.mark.parametrize("text", ["ingest=0", "detect=x", "vera=1", "2", "ingest"])
def test_a_bad_workers_value_is_refused_by_name(text: str) -> None:
    with pytest.raises(ConfigError, match="--workers"):
        parse_workers(text, plan_workers(4, 0, STAGES))


def test_device_auto_picks_the_cpu_without_cuda_and_the_first_gpu_with_it() -> None:
    assert resolve_device("auto", cuda_available=False) == "cpu"
    assert resolve_device("auto", cuda_available=True) == "cuda:0"
    assert resolve_device("cuda:1", cuda_available=False) == "cuda:1"
    assert DetectSettings().device == "auto"


def test_device_auto_on_this_machine_follows_torch() -> None:
    import torch

    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto") == expected


def test_an_explicit_detect_device_gets_one_detect_worker_on_it() -> None:
    # Given detect.device=cpu on a machine with two GPUs
    settings = Settings(detect=DetectSettings(device="cpu"))
    # When planned / Then one detect worker on the CPU
    plan = machine_plan(settings, STAGES, cores=8, gpus=2)
    assert plan.workers["detect"] == 1 and plan.detect_devices == ["cpu"]


def test_children_get_their_device_and_decoder() -> None:
    # Given a two-GPU plan with NVDEC on one ingest process per GPU, decoder=auto
    settings = Settings(ingest=IngestSettings(decoder="auto"))
    plan = parse_workers("ingest=3", plan_workers(16, 2, STAGES, nvdec=True))
    # When the children's environments are made
    envs = child_envs(plan, settings)
    # Then two ingest children decode with nvdec, one with pyav, and each detect has its GPU
    decoders = [env["ROADSTREAM_INGEST__DECODER"] for stage, env in envs if stage == "ingest"]
    devices = [env["ROADSTREAM_DETECT__DEVICE"] for stage, env in envs if stage == "detect"]
    assert decoders == ["nvdec", "nvdec", "pyav"]
    assert devices == ["cuda:0", "cuda:1"]
    # and every ingest child takes one job at a time and reads none ahead (jobs wait in
    # the stream for the first free process), while detect keeps its read-ahead
    ingest = [env for stage, env in envs if stage == "ingest"]
    assert all(env["ROADSTREAM_WORKER__BATCH_SIZE"] == "1" and env["ROADSTREAM_WORKER__PREFETCH"] == "0"
               for env in ingest)  # fmt: skip
    assert all("ROADSTREAM_WORKER__PREFETCH" not in env for stage, env in envs if stage == "detect")
    # and the decoder threads of the three ingest processes share the 16 cores
    assert {env["ROADSTREAM_INGEST__DECODER_THREADS"] for env in ingest} == {"5"}
    # and each decodes two clips of a job at once (a long drive's camera job is the tail),
    # an NVDEC one four (a session each)
    assert [env["ROADSTREAM_INGEST__PARALLEL_CLIPS"] for env in ingest] == ["4", "4", "2"]
    # unless the settings name a count
    chosen = Settings(ingest=IngestSettings(decoder="auto", parallel_clips=1))
    assert not any("ROADSTREAM_INGEST__PARALLEL_CLIPS" in env for _, env in child_envs(plan, chosen))


def test_a_pyav_process_per_core_decodes_one_clip_with_one_thread() -> None:
    # Given the plan of a 16-core box with a GPU and NVDEC: 14 ingest processes, one NVDEC
    settings = Settings(ingest=IngestSettings(decoder="auto"))
    plan = machine_plan(settings, STAGES, cores=16, gpus=1, nvdec=True)
    # When the children's environments are made
    ingest = [env for stage, env in child_envs(plan, settings) if stage == "ingest"]
    # Then each PyAV process decodes one clip at a time with one decoder thread (its core),
    pyav = [env for env in ingest if env["ROADSTREAM_INGEST__DECODER"] == "pyav"]
    assert len(pyav) == 13
    assert {(env["ROADSTREAM_INGEST__DECODER_THREADS"], env["ROADSTREAM_INGEST__PARALLEL_CLIPS"]) for env in pyav} \
        == {("1", "1")}
    # while the NVDEC one keeps four clips of a job at once (a session each)
    (nvdec,) = [env for env in ingest if env["ROADSTREAM_INGEST__DECODER"] == "nvdec"]
    assert nvdec["ROADSTREAM_INGEST__PARALLEL_CLIPS"] == "4"
    # and settings that name the threads win
    named = Settings(ingest=IngestSettings(decoder="auto", decoder_threads=3))
    assert not any("ROADSTREAM_INGEST__DECODER_THREADS" in env for _, env in child_envs(plan, named))


def test_nvdec_processes_and_sessions_come_from_the_settings() -> None:
    # Given two GPUs, NVDEC allowed, two NVDEC processes per GPU with 6 sessions each
    settings = Settings(ingest=IngestSettings(decoder="auto", nvdec_processes=2, nvdec_sessions=6))
    plan = plan_workers(16, 2, STAGES, nvdec=True, nvdec_per_gpu=settings.ingest.nvdec_processes)
    # When the children's environments are made
    ingest = [env for stage, env in child_envs(plan, settings) if stage == "ingest"]
    # Then four ingest children decode with NVDEC, spread over both GPUs, 6 jobs at once each
    nvdec = [env for env in ingest if env["ROADSTREAM_INGEST__DECODER"] == "nvdec"]
    assert plan.nvdec_ingest == 4 and len(nvdec) == 4
    assert [env["ROADSTREAM_INGEST__NVDEC_DEVICE"] for env in nvdec] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assert {env["ROADSTREAM_WORKER__CONCURRENCY"] for env in nvdec} == {"6"}
    # and the PyAV children keep one job at a time
    assert all("ROADSTREAM_WORKER__CONCURRENCY" not in env for env in ingest if env not in nvdec)
    # and no NVDEC process at all with nvdec_processes=0
    assert plan_workers(16, 2, STAGES, nvdec=True, nvdec_per_gpu=0).nvdec_ingest == 0


def test_the_private_redis_keeps_nothing_on_disk_and_bounds_its_memory(tmp_path: Path) -> None:
    args = private_redis_args(tmp_path / "s.sock", tmp_path, BrokerSettings(max_blob_bytes=100 * 2**20))
    options = dict(zip(args[::2], args[1::2], strict=True))
    assert options["--save"] == "" and options["--appendonly"] == "no"
    assert int(options["--maxmemory"]) == 200 * 2**20 + 512 * 2**20
    assert options["--maxmemory-policy"] == "noeviction"

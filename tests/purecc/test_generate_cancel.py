"""``generate(should_stop=...)``: a render stops between denoising steps, and only when asked."""

import asyncio
import threading
import time

import numpy as np
import pytest

from purecc.generate import RenderCancelled, RenderSettings, Sample, generate
from purecc.model import load_pipeline

SETTINGS = RenderSettings(steps=6, guidance=4.0, width=64, height=64)
SAMPLES = [Sample("a red square", 3), Sample("a blue circle", 4)]


class StepCounter:
    """``should_stop`` that answers True from its ``stop_at``-th question on, counting the questions."""

    def __init__(self, stop_at: int | None):
        self.stop_at, self.asked = stop_at, 0

    def __call__(self) -> bool:
        self.asked += 1
        return self.stop_at is not None and self.asked >= self.stop_at


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return load_pipeline(str(tiny_model_dir))


def test_stops_between_steps(pipe):
    stop = StepCounter(stop_at=3)      # asked before step 1, after step 1, after step 2
    with pytest.raises(RenderCancelled) as info:
        generate(pipe, SAMPLES, {}, SETTINGS, output_type="np", should_stop=stop)
    assert (info.value.steps_done, info.value.steps) == (2, SETTINGS.steps)
    assert stop.asked == 3, "nothing is asked after the render stopped"
    assert "2 of 6" in str(info.value)


def test_stops_before_the_first_step(pipe):
    with pytest.raises(RenderCancelled) as info:
        generate(pipe, SAMPLES, {}, SETTINGS, should_stop=lambda: True)
    assert info.value.steps_done == 0


def test_never_stopping_changes_nothing(pipe):
    stop = StepCounter(stop_at=None)
    plain = generate(pipe, SAMPLES, {}, SETTINGS, output_type="np")
    asked = generate(pipe, SAMPLES, {}, SETTINGS, output_type="np", should_stop=stop)
    assert stop.asked == SETTINGS.steps + 1
    assert np.array_equal(np.stack(plain), np.stack(asked))


def test_a_stopped_render_leaves_the_pipeline_as_it_was(pipe, tiny_model_dir):
    with pytest.raises(RenderCancelled):
        generate(pipe, SAMPLES, {}, SETTINGS, should_stop=StepCounter(stop_at=2))
    again = generate(pipe, SAMPLES, {}, SETTINGS, output_type="np")
    fresh = generate(load_pipeline(str(tiny_model_dir)), SAMPLES, {}, SETTINGS, output_type="np")
    assert np.array_equal(np.stack(again), np.stack(fresh))


# ----- the caller's cancellation in the generator deployment (services.deployment) ----------------
# The deployment class is used outside Serve, as benchmarks do: its pass (``_run_pass``, the body of
# the @serve.batch ``_render_batch``, which only runs batched inside a replica) and ``_Pending.gone()``.
# Every request's deadline is an hour away: what stops a pass here is its callers' cancellation
# (``_Pending.cancelled``, set by ``render()`` when its caller is cancelled), never a timeout.
LONG = RenderSettings(steps=40, guidance=4.0, width=64, height=64)


class TransformerCalls:
    """A forward hook on the pipeline's transformer: the input batch of every call (one call per
    denoising step; with guidance the batch is 2 x the samples), ``at[n]()`` run inside call n."""

    def __init__(self, pipe):
        self.batches: list[int] = []
        self.at: dict = {}
        self.first = threading.Event()
        self._handle = pipe.transformer.register_forward_hook(self._on_call, with_kwargs=True)

    def _on_call(self, module, args, kwargs, output):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        self.batches.append(int(hidden.shape[0]))
        self.first.set()
        action = self.at.get(len(self.batches))
        if action is not None:
            action()

    def close(self) -> None:
        self._handle.remove()


@pytest.fixture(scope="module")
def generator(tiny_model_dir, tmp_path_factory):
    from services.config import ServiceConfig
    from services.deployment import ConceptGenerator

    config = ServiceConfig(model=str(tiny_model_dir), registry=str(tmp_path_factory.mktemp("registry")), slots=1,
                           warmup=False, device="cpu", request_timeout_s=3600.0)
    return ConceptGenerator(config)


@pytest.fixture()
def calls(generator):
    hook = TransformerCalls(generator.pipe)
    yield hook
    hook.close()


def _pending(generator, prompt: str, seed: int):
    from services.deployment import RenderTask, _Pending

    lease = asyncio.run(generator.slots.acquire([], timeout=5))     # a real (empty) slot lease
    return _Pending(RenderTask(prompt, (seed,), LONG), lease, time.perf_counter(), time.monotonic() + 3600)


def test_a_callers_cancel_stops_the_replicas_pass_between_steps(generator, calls):
    pending = _pending(generator, "a red square", 3)
    result: dict = {}

    def render_thread():                     # the pass runs in a worker thread, as in the replica
        try:
            result["pngs"] = generator._run_pass([pending], LONG)
        except BaseException as exc:          # noqa: BLE001 - inspected below
            result["error"] = exc

    thread = threading.Thread(target=render_thread)
    thread.start()
    try:
        assert calls.first.wait(120), "the pass never started"
        assert not pending.gone()            # running, its caller waiting, its deadline far
        pending.cancelled = True             # from the event loop's thread, as render() does
        assert pending.gone()
    finally:
        thread.join(300)
        pending.lease.release()
    assert not thread.is_alive() and "pngs" not in result, result
    stop = result["error"]
    assert isinstance(stop, RenderCancelled), repr(stop)
    assert 1 <= stop.steps_done < LONG.steps and stop.steps == LONG.steps, str(stop)
    assert calls.batches == [2] * stop.steps_done, calls.batches     # no step computed after the stop


def test_a_pass_stops_once_every_caller_in_it_cancelled_and_returns_the_cancellation(generator, calls):
    from services.deployment import ConceptGenerator

    pending = [_pending(generator, "a red square", 3), _pending(generator, "a blue circle", 4)]
    # their callers cancel at known steps: the first at step 2 (the pass goes on for the second),
    # the second at step 5 (nobody waits any more: the pass stops there)
    calls.at[2] = lambda: setattr(pending[0], "cancelled", True)
    calls.at[5] = lambda: setattr(pending[1], "cancelled", True)
    batch_body = ConceptGenerator._render_batch.__wrapped__         # the @serve.batch pass, unbatched
    try:
        outcomes = asyncio.run(asyncio.wait_for(batch_body(generator, pending), 300))
    finally:
        for p in pending:
            p.lease.release()
    assert calls.batches == [4] * 5, calls.batches       # one shared pass of both, stopped after step 5
    assert all(isinstance(o, RenderCancelled) for o in outcomes), outcomes     # answered, not raised
    assert [(o.steps_done, o.steps) for o in outcomes] == [(5, LONG.steps)] * 2

"""``generate(should_stop=...)``: a render stops between denoising steps, and only when asked."""

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

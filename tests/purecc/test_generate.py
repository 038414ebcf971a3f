import numpy as np
import pytest
import torch
from peft import PeftModel

from purecc.generate import RenderSettings, Sample, fill_placeholders, generate, load_concepts
from purecc.model import load_pipeline
from purecc.recipe import stage_recipe
from purecc.trainer import ConceptJob, PackTrainer

IDS = {"checkered-star": "zqx", "striped-circle": "vlk", "dotted-diamond": "bxj"}
SETTINGS = RenderSettings(steps=4, guidance=4.0, width=64, height=64)


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, sample_manifests, tmp_path_factory):
    """Three concepts trained for a few steps at a high learning rate, exported as adapter folders."""
    # the LoRA alone (what stock peft/diffusers load): these tests compare with them
    recipe = stage_recipe(1, steps=15, resolution=64, grad_accum=1, lr=2e-2, embeddings="none")
    jobs = [ConceptJob(cid, trig, sample_manifests[cid], recipe, seed=i) for i, (cid, trig) in enumerate(IDS.items())]
    t = PackTrainer(load_pipeline(str(tiny_model_dir)), jobs)
    t.setup()
    t.train()
    root = tmp_path_factory.mktemp("adapters")
    return {cid: t.export(cid, root / cid) for cid in IDS}


def test_heterogeneous_batch_equals_separate_runs(tiny_model_dir, adapters):
    pipe = load_pipeline(str(tiny_model_dir))
    loaded = load_concepts(pipe, list(adapters.values()))
    samples = [Sample("a zqx star", 1, (("checkered-star", 1.0),)),
               Sample("a vlk circle and a bxj diamond", 2, (("striped-circle", 0.8), ("dotted-diamond", 1.0))),
               Sample("a red square", 3, ())]
    batch = generate(pipe, samples, loaded.slot_of, SETTINGS, output_type="np")
    for i, s in enumerate(samples):
        alone = generate(pipe, [s], loaded.slot_of, SETTINGS, output_type="np")[0]
        assert np.abs(alone - batch[i]).max() < 1e-4
    assert np.abs(batch[0] - generate(pipe, [Sample("a zqx star", 1)], {}, SETTINGS, output_type="np")[0]).max() > 1e-3


def test_exported_adapter_loads_in_peft_and_diffusers(tiny_model_dir, adapters):
    folder = adapters["checkered-star"]
    ours_pipe = load_pipeline(str(tiny_model_dir))
    loaded = load_concepts(ours_pipe, [folder])
    ours = generate(ours_pipe, [Sample("a zqx star", 7, (("checkered-star", 1.0),))], loaded.slot_of, SETTINGS,
                    output_type="np")[0]

    def render(pipe):
        gen = [torch.Generator().manual_seed(7)]
        latents = torch.randn((16, 8, 8), generator=torch.Generator().manual_seed(7))[None]
        return pipe("a zqx star", negative_prompt="", num_inference_steps=4, guidance_scale=4.0, width=64,
                    height=64, generator=gen, latents=latents, output_type="np", max_sequence_length=77).images[0]

    peft_pipe = load_pipeline(str(tiny_model_dir))
    peft_pipe.transformer = PeftModel.from_pretrained(peft_pipe.transformer, folder)  # the seed's Quick Start
    diff_pipe = load_pipeline(str(tiny_model_dir))
    diff_pipe.load_lora_weights(folder, adapter_name="zigzag_star")
    base = render(load_pipeline(str(tiny_model_dir)))
    assert np.abs(render(peft_pipe) - ours).max() < 1e-4
    assert np.abs(render(diff_pipe) - ours).max() < 1e-4
    assert np.abs(base - ours).max() > 1e-3


def test_composition_weights_zero_equals_single_concept(tiny_model_dir, adapters):
    pipe = load_pipeline(str(tiny_model_dir))
    loaded = load_concepts(pipe, [adapters["checkered-star"], adapters["striped-circle"]])
    one = generate(pipe, [Sample("p", 5, (("checkered-star", 1.0),))], loaded.slot_of, SETTINGS, output_type="np")
    two = generate(pipe, [Sample("p", 5, (("checkered-star", 1.0), ("striped-circle", 0.0)))], loaded.slot_of,
                   SETTINGS, output_type="np")
    assert np.abs(one[0] - two[0]).max() < 1e-6


def test_fill_placeholders():
    assert fill_placeholders("a <zig> next to a <ring>", {"zig": "zqx", "ring": "vlk"}) == "a zqx next to a vlk"
    with pytest.raises(KeyError, match="nope"):
        fill_placeholders("a <nope>", {})


def test_loading_onto_another_base_is_refused(tmp_path, adapters):
    from purecc.adapter_files import AdapterFileError
    from purecc.tiny import TinyConfig, write_tiny_model

    other = load_pipeline(str(write_tiny_model(tmp_path / "other", TinyConfig(seed=9))))
    with pytest.raises(AdapterFileError, match="trained on base"):
        load_concepts(other, [adapters["checkered-star"]])


def test_serving_encodes_prompts_with_the_trained_length():
    """The prompt length recorded by training decides the length used when rendering its concepts."""
    from purecc.adapter_files import AdapterManifest
    from purecc.generate import trained_sequence_length

    def manifest(cid, length):
        return AdapterManifest(cid, "zqx", 2, 10, 4, 4.0, [], "fp", max_sequence_length=length)
    assert trained_sequence_length([]) is None
    assert trained_sequence_length([manifest("a", 77), manifest("b", 77)]) == 77
    with pytest.raises(ValueError, match="max_sequence_length"):
        trained_sequence_length([manifest("a", 77), manifest("b", 128)])

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

from purecc.bank import attach_bank, find_targets, one_hot_routing


def _inputs(tr, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = tr.config
    return dict(hidden_states=torch.randn(batch, 16, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(batch, 154, c.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(batch, c.pooled_projection_dim, generator=g),
                timestep=torch.linspace(100.0, 900.0, batch))


def _random_slot(bank, slot, seed):
    g = torch.Generator().manual_seed(seed)
    bank.load_slot(slot, torch.randn(bank.params_per_slot, generator=g) * 0.2)


@torch.no_grad()
def test_single_slot_equals_peft_lora(tiny_model_dir):
    from purecc.model import load_pipeline

    ours, ref = load_pipeline(str(tiny_model_dir)).transformer, load_pipeline(str(tiny_model_dir)).transformer
    bank = attach_bank(ours, 1, rank=4, alpha=4)
    _random_slot(bank, 0, seed=1)
    targets = [s.name for s in bank.specs]
    ref = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=targets), ref)
    sd = {}
    for name, (a, b) in bank.unflatten(bank.read_slot(0)).items():
        sd[f"{name}.lora_A.weight"], sd[f"{name}.lora_B.weight"] = a, b
    result = set_peft_model_state_dict(ref, sd)
    assert not result.unexpected_keys
    x = _inputs(ours)
    with bank.routing(one_hot_routing([0, 0], 1)):
        got = ours(**x).sample
    want = ref(**x).sample
    assert (got - want).abs().max() < 1e-5
    assert (got - ours(**x).sample).abs().max() > 1e-3  # the adapter does something


def test_targets_are_the_eight_joint_attention_projections(tiny_pipe):
    names = find_targets(tiny_pipe.transformer)
    n_blocks = len(tiny_pipe.transformer.transformer_blocks)
    assert len(names) == 8 * n_blocks - 1  # the last block has no to_add_out
    assert not any(".attn2." in n for n in names)


@torch.no_grad()
def test_routing_composes_slots_linearly_per_sample(tiny_pipe):
    tr = tiny_pipe.transformer
    bank = attach_bank(tr, 3)
    _random_slot(bank, 0, 1)
    _random_slot(bank, 2, 2)
    x = _inputs(tr, batch=3)
    mixed = torch.tensor([[1.0, 0, 0], [0, 0, 0], [0.5, 0, 1.0]])
    with bank.routing(mixed):
        out = tr(**x).sample
    for b in range(3):
        single = {k: v[b:b + 1] for k, v in x.items()}
        with bank.routing(mixed[b:b + 1]):
            alone = tr(**single).sample
        assert (out[b] - alone[0]).abs().max() < 1e-5
    assert (out[1] - tr(**{k: v[1:2] for k, v in x.items()}).sample[0]).abs().max() < 1e-5


def test_slots_clear_and_refuse_bad_input(tiny_pipe):
    bank = attach_bank(tiny_pipe.transformer, 2)
    _random_slot(bank, 1, 3)
    assert bank.read_slot(1).abs().sum() > 0
    bank.clear_slot(1)
    assert bank.read_slot(1).abs().sum() == 0
    with pytest.raises(IndexError, match="slot"):
        bank.clear_slot(2)
    with pytest.raises(ValueError, match="expected"):
        bank.load_slot(0, torch.zeros(3))
    with pytest.raises(ValueError, match="routing"):
        bank.set_routing(torch.zeros(1, 5))
    with pytest.raises(RuntimeError, match="once"):
        attach_bank(tiny_pipe.transformer, 2)


def test_flatten_unflatten_round_trip_and_shape_check(tiny_pipe):
    bank = attach_bank(tiny_pipe.transformer, 1)
    flat = torch.randn(bank.params_per_slot)
    layers = bank.unflatten(flat)
    assert torch.equal(bank.flatten(layers), flat)
    name = next(iter(layers))
    a, b = layers[name]
    with pytest.raises(ValueError, match="adapter shapes"):
        bank.flatten({**layers, name: (a[:2], b)})
    with pytest.raises(ValueError, match="missing"):
        bank.flatten({k: v for k, v in layers.items() if k != name})


def test_init_slot_is_a_no_op_adapter(tiny_pipe):
    bank = attach_bank(tiny_pipe.transformer, 1)
    bank.init_slot(0, torch.Generator().manual_seed(0))
    for a, b in bank.unflatten(bank.read_slot(0)).values():
        assert b.abs().sum() == 0
        assert 0.15 < a.std() < 0.35  # std 1/r = 0.25


def test_an_overflowing_slot_changes_no_other_samples_output(tiny_pipe):
    """A slot a sample does not use adds exact zeros even when its activations overflow (no 0 * inf)."""
    bank = attach_bank(tiny_pipe.transformer, 2)
    g = torch.Generator().manual_seed(0)
    bank.load_slot(0, 0.05 * torch.randn(bank.params_per_slot, generator=g))
    x = torch.randn(2, 16, 8, 8, generator=g)
    enc, pooled = torch.randn(2, 154, 64, generator=g), torch.randn(2, 64, generator=g)

    def run():
        with torch.no_grad(), bank.routing(torch.tensor([[1.0, 0.0], [0.0, 1.0]])):
            return tiny_pipe.transformer(hidden_states=x, timestep=torch.tensor([500.0, 500.0]),
                                         encoder_hidden_states=enc, pooled_projections=pooled,
                                         return_dict=False)[0]
    clean = run()
    bank.load_slot(1, torch.full((bank.params_per_slot,), 3e38))          # finite, but overflows in use
    dirty = run()
    assert torch.equal(dirty[0], clean[0])                                 # sample 0 uses slot 0 only
    assert not torch.isfinite(dirty[1]).all()

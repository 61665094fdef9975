"""Multi-adapter serving (ExpertWeave): a mixed batch equals each adapter's merged model, and bad input is named."""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from zoo import upcycle
from zoo.inference import MultiAdapterMoE, generate
from zoo.io.checkpoint import CheckpointError
from zoo.io.expert_adapter import ExpertAdapter, read_expert_adapter
from zoo.io.moe_lm import load_moe_lm, save_moe_lm
from zoo.transforms.esft import apply_expert_adapter, save_expert_adapter, stacked_params

# each adapter replaces different experts; c lists its rows out of order
SELECTIONS = {"a": {0: [1], 1: [0, 2]}, "b": {0: [0, 3]}, "c": {0: [2], 1: [3, 1]}}
ADAPTERS = ["a", None, "b", "c", "a", "c", None, "b"]
NEW_TOKENS = 8


def _moe(seed=0):
    torch.manual_seed(seed)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1))
    # float64: left padding changes float sums by ~1e-16, far below any logit gap greedy decoding meets
    return upcycle(lm, num_experts=4, router_options={"top_k": 2}, method="noisy", method_options={"scale": 0.1}).double()


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory):
    """A base checkpoint and three ESFT adapters made by perturbing its experts."""
    root = tmp_path_factory.mktemp("serving")
    base = _moe()
    base_dir = save_moe_lm(base, root / "base")
    paths = {}
    for n, (name, selected) in enumerate(SELECTIONS.items()):
        tuned = copy.deepcopy(base)
        g = torch.Generator().manual_seed(10 + n)
        with torch.no_grad():
            for layer, ids in selected.items():
                for p in stacked_params(tuned.moe_layers()[layer]).values():
                    p[ids] += 0.5 * torch.randn(p[ids].shape, generator=g, dtype=p.dtype)
        paths[name] = save_expert_adapter(tuned, selected, root / name, base_dir)
    return base_dir, paths


def _prompts():
    g = torch.Generator().manual_seed(5)
    return [torch.randint(3, 97, (int(n),), generator=g).tolist() for n in torch.randint(3, 10, (len(ADAPTERS),), generator=g)]


def _merged(base_dir, path):
    model = load_moe_lm(base_dir)[0].eval()
    return model if path is None else apply_expert_adapter(model, path, base_dir)


def _server(base_dir, paths):
    return MultiAdapterMoE(load_moe_lm(base_dir)[0].eval(), paths, base_dir)


def test_each_request_of_a_mixed_batch_gets_its_adapters_merged_model(zoo_dir):
    base_dir, paths = zoo_dir
    prompts = _prompts()
    server = _server(base_dir, paths)
    got = generate(server, prompts, adapters=ADAPTERS, max_new_tokens=NEW_TOKENS)

    merged = {name: _merged(base_dir, paths.get(name)) for name in [None, *SELECTIONS]}
    want, logits = [], []
    for prompt, name in zip(prompts, ADAPTERS, strict=True):
        ids = torch.tensor([prompt])
        out = merged[name].generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                    do_sample=False, pad_token_id=0)  # transformers' greedy loop, request alone
        want.append(out[0, len(prompt):].tolist())
        logits.append(merged[name](input_ids=ids).logits[0])
    assert got == want
    # the adapters matter: each one's requests decode differently on the base
    base_tokens = generate(merged[None], prompts, max_new_tokens=NEW_TOKENS)
    for name in SELECTIONS:
        assert any(got[r] != base_tokens[r] for r, a in enumerate(ADAPTERS) if a == name), name

    # prefill logits of the left-padded mixed batch, row by row, against each merged model alone
    ids = torch.zeros(len(prompts), max(map(len, prompts)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, ids.shape[1] - len(p):], mask[r, ids.shape[1] - len(p):] = torch.tensor(p), 1
    with torch.no_grad():
        pooled = server(ids, mask, adapters=ADAPTERS, position_ids=(mask.cumsum(-1) - 1).clamp_min(0)).logits
    for r, p in enumerate(prompts):
        torch.testing.assert_close(pooled[r, -len(p):], logits[r], rtol=1e-10, atol=1e-10)


def test_the_pool_holds_the_base_experts_once_plus_each_adapters_rows(zoo_dir):
    base_dir, paths = zoo_dir
    base = load_moe_lm(base_dir)[0]
    base_bytes = sum(p.numel() * p.element_size() for moe in base.moe_layers().values() for p in stacked_params(moe).values())
    server = _server(base_dir, paths)
    adapter_bytes = sum(read_expert_adapter(p).num_bytes for p in paths.values())
    assert server.base_expert_bytes() == base_bytes
    assert server.expert_bytes() == base_bytes + adapter_bytes
    one_expert = base_bytes // (2 * 4)  # 2 layers of 4 experts
    assert adapter_bytes == one_expert * sum(len(ids) for s in SELECTIONS.values() for ids in s.values())
    # routers and every non-expert weight are the base's, untouched
    served = server.model.state_dict()
    for k, v in base.state_dict().items():
        if ".experts." not in k:
            assert torch.equal(served[k], v), k
    for i, moe in server.model.moe_layers().items():
        assert moe.router.num_experts == 4 and moe.experts.num_experts == 4 + sum(len(s.get(i, [])) for s in SELECTIONS.values())


def test_bad_adapters_and_requests_are_refused_naming_the_cause(zoo_dir, tmp_path):
    base_dir, paths = zoo_dir
    server = _server(base_dir, paths)
    prompts = _prompts()[:2]
    with pytest.raises(ValueError, match=r"request 1 names adapter 'zzz', unknown to this server; it holds \['a', 'b', 'c'\]"):
        generate(server, prompts, adapters=["a", "zzz"])
    with pytest.raises(ValueError, match="3 adapter ids for a batch of 2 requests"):
        generate(server, prompts, adapters=["a", "b", "c"])
    with pytest.raises(ValueError, match="got no per-token adapter ids"):
        server.model(input_ids=torch.tensor([prompts[0]]))
    with pytest.raises(ValueError, match="padded on the right"):
        generate(server, {"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 0], [1, 1, 1]])},
                 adapters=["a", None])
    with pytest.raises(ValueError, match=r"adapters \['a'\] given for a plain MoECausalLM"):
        generate(load_moe_lm(base_dir)[0], prompts, adapters=["a", None])

    other_dir = save_moe_lm(_moe(seed=1), tmp_path / "other")
    foreign = save_expert_adapter(load_moe_lm(other_dir)[0], {0: [1]}, tmp_path / "foreign", other_dir)
    with pytest.raises(CheckpointError, match=r"expert adapter 'x' was made for base [0-9a-f]{64}, but the served base .* is [0-9a-f]{64}"):
        _server(base_dir, {"a": paths["a"], "x": foreign})

    good = read_expert_adapter(paths["a"])
    with_router = ExpertAdapter(good.experts, good.base_sha256, {**good.tensors, "0/router.weight": torch.zeros(1, 32)})
    with pytest.raises(ValueError, match=r"carries tensors that are not rows of its layers' stacked experts: \['0/router.weight'\]"):
        _server(base_dir, {"r": with_router})
    wrong_id = ExpertAdapter({1: [7]}, good.base_sha256, {})
    with pytest.raises(ValueError, match=r"expert adapter 'w': layer 1 has experts 0..3, not \[7\]"):
        _server(base_dir, {"w": wrong_id})
    with pytest.raises(ValueError, match="already have an expert map"):
        MultiAdapterMoE(server.model, {"b": paths["b"]}, base_dir)
    with pytest.raises(ValueError, match="no adapters given"):
        _server(base_dir, {})
    shard = load_moe_lm(base_dir)[0]
    shard.moe_layers()[1].experts.num_local_experts = 2  # what an expert-parallel shard carries
    with pytest.raises(ValueError, match=r"MoE layers \[1\] hold an expert-parallel shard"):
        MultiAdapterMoE(shard, paths, base_dir)

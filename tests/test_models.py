"""VideoMAE ViTs: architecture, attention, positions, cost, and parity with transformers."""

from __future__ import annotations

import pytest
import torch
from ckpt_fixtures import clip, hf_classifier, tiny_model
from torch.utils.flop_counter import FlopCounterMode

from videofeat.models import create_model, list_models
from videofeat.models.layers import Attention, resample_pos_embed, sinusoid_table


def test_registered_names() -> None:
    expected = {f"videomae_vit_{s}_patch16_224" for s in ("small", "base", "large", "huge")}
    expected |= {"videomae_vit_giant_patch14_224", "videomae_test"}
    assert expected <= set(list_models())
    with pytest.raises(ValueError, match="unknown model 'vit_nope'"):
        create_model("vit_nope")
    with pytest.raises(TypeError, match="unknown option"):
        create_model("videomae_test", depthh=3)


def test_models_import_only_models_at_module_level_without_a_circle() -> None:
    # Read from the source, so a function-local import cannot hide an arrow or a circle.
    import ast
    from graphlib import TopologicalSorter
    from pathlib import Path

    import videofeat.models

    folder = Path(videofeat.models.__file__).parent
    graph: dict[str, set[str]] = {}
    for path in sorted(folder.glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        top_level = {id(node) for node in tree.body}
        ours = [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                and (node.module or "").startswith("videofeat")]
        ours += [node for node in ast.walk(tree) if isinstance(node, ast.Import)
                 and any(alias.name.startswith("videofeat") for alias in node.names)]
        for node in ours:
            module = getattr(node, "module", None) or node.names[0].name
            assert id(node) in top_level, f"{path.name}:{node.lineno}: function-local import of {module}"
            assert module.startswith("videofeat.models."), f"{path.name}:{node.lineno} imports {module}"
        graph[path.stem] = {node.module.rsplit(".", 1)[1] for node in ours} if path.stem != "__init__" else set()
    order = list(TopologicalSorter(graph).static_order())  # raises CycleError on a circle
    assert order.index("registry") < order.index("videomae") < order.index("checkpoint") < order.index("factory")
    assert graph["registry"] == set() and graph["layers"] == set()


# VideoMAE paper (Tong et al. 2022), Table on model cost at 16x224: GMACs and parameters (M).
PAPER_COST = {
    "videomae_vit_base_patch16_224": (180, 87),
    "videomae_vit_large_patch16_224": (597, 305),
    "videomae_vit_huge_patch16_224": (1192, 633),
}


@pytest.mark.parametrize("name", sorted(PAPER_COST))
def test_cost_matches_paper(name: str) -> None:
    with torch.device("meta"):
        model = create_model(name).eval()
        x = torch.empty(1, 3, 16, 224, 224)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    gmacs = counter.get_total_flops() / 2e9
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    paper_gmacs, paper_params = PAPER_COST[name]
    assert abs(gmacs / paper_gmacs - 1) < 0.02, gmacs
    assert abs(params_m / paper_params - 1) < 0.02, params_m


def test_big_variants_build_with_overrides() -> None:
    with torch.device("meta"):
        huge448 = create_model("videomae_vit_huge_patch16_224", img_size=448, drop_path_rate=0.2)
        large32 = create_model("videomae_vit_large_patch16_224", num_frames=32, num_classes=16)
        giant = create_model("videomae_vit_giant_patch14_224")
        custom = create_model("videomae_vit_base_patch16_224", embed_dim=512, depth=4, num_heads=8,
                              mlp_ratio=2.0, tubelet_size=4, num_classes=0)
    assert huge448.pos_embed.shape == (1, 8 * 28 * 28, 1280)
    assert large32.patch_embed.grid_size == (16, 14, 14) and large32.num_classes == 16
    assert giant.blocks[0].mlp.fc1.out_features == 6144 and len(giant.blocks) == 40
    assert giant.patch_embed.grid_size == (8, 16, 16)
    assert custom.arch["tubelet_size"] == 4 and custom.num_features == 512 and custom.num_classes == 0
    assert isinstance(custom.head, torch.nn.Identity)


@pytest.mark.parametrize("frames,size,tokens", [(16, 224, 1568), (32, 224, 3136), (16, 448, 6272)])
def test_position_table_matches_grid(frames: int, size: int, tokens: int) -> None:
    with torch.device("meta"):
        model = create_model("videomae_vit_large_patch16_224", num_frames=frames, img_size=size)
    assert model.pos_embed.shape == (1, tokens, 1024)
    assert model.patch_embed.num_patches == tokens
    # fixed table: a non-persistent buffer, never in the state dict
    assert "pos_embed" not in model.state_dict()


def test_sinusoid_table_equals_reference() -> None:
    from transformers.models.videomae.modeling_videomae import get_sinusoid_encoding_table

    ours = sinusoid_table(392, 768)
    assert torch.equal(ours, get_sinusoid_encoding_table(392, 768))


def test_sdpa_attention_equals_explicit_softmax() -> None:
    torch.manual_seed(0)
    attn = Attention(dim=32, num_heads=4, qkv_bias=True).eval()
    with torch.no_grad():
        attn.q_bias.normal_()
        attn.v_bias.normal_()
    x = torch.randn(2, 10, 32)
    w = attn.qkv.weight
    q = x @ w[:32].T + attn.q_bias
    k = x @ w[32:64].T  # no k bias
    v = x @ w[64:].T + attn.v_bias
    q, k, v = (t.reshape(2, 10, 4, 8).transpose(1, 2) for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-2, -1) / 8 ** 0.5, dim=-1)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(2, 10, 32))
    torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-6)


def test_eval_is_deterministic_train_is_not() -> None:
    model = tiny_model(drop_path_rate=0.5, fc_drop_rate=0.5)
    x = clip()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.train()
        assert not torch.equal(model(x), model(x))


def test_forward_api() -> None:
    model = tiny_model()
    x = clip()
    with torch.no_grad():
        features = model.forward_features(x)
        logits = model.forward_head(features)
        both = model.forward_features_and_logits(x)
    assert features.shape == (2, model.num_features) and logits.shape == (2, model.num_classes)
    assert torch.equal(both[0], features) and torch.equal(both[1], logits)
    assert torch.equal(model(x), logits)
    headless = tiny_model(num_classes=0)
    f, none = headless.forward_features_and_logits(x)
    assert none is None and f.shape == (2, 64)
    with pytest.raises(ValueError, match="16x64x64"):
        model(torch.zeros(1, 3, 16, 64, 64))


def test_grad_checkpointing_gives_same_output_and_grads() -> None:
    x = clip()
    plain = tiny_model().train()
    ckpt = tiny_model(use_checkpoint=True).train()
    assert ckpt.grad_checkpointing
    plain(x).sum().backward()
    ckpt(x).sum().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    plain.set_grad_checkpointing(True)
    assert plain.grad_checkpointing


def test_learned_pos_embed_resample() -> None:
    table = torch.randn(1, 4 * 4 * 4, 8)
    assert resample_pos_embed(table, (4, 4, 4), (4, 4, 4)) is table
    flat = torch.ones(1, 4 * 4 * 4, 8) * torch.arange(8.0)
    out = resample_pos_embed(flat, (4, 4, 4), (8, 6, 6))
    assert out.shape == (1, 8 * 6 * 6, 8)
    # constant along the grid stays constant: interpolation weights sum to one
    torch.testing.assert_close(out, torch.ones(1, 288, 8) * torch.arange(8.0))


def _hf_to_original(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Written here, separately from the library's converter, so the parity check is independent."""
    out = {}
    for key, value in hf_state.items():
        key = key.replace("videomae.embeddings.patch_embeddings.projection", "patch_embed.proj")
        key = key.replace("videomae.encoder.layer.", "blocks.").replace("classifier.", "head.")
        for old, new in (("layernorm_before", "norm1"), ("layernorm_after", "norm2"),
                         ("attention.output.dense", "attn.proj"), ("intermediate.dense", "mlp.fc1"),
                         ("output.dense", "mlp.fc2")):
            key = key.replace(old, new)
        out[key] = value
    for i in range(2):
        p = f"blocks.{i}.attention.attention."
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([out.pop(p + n + ".weight") for n in ("query", "key", "value")])
        out[f"blocks.{i}.attn.q_bias"] = out.pop(p + "query.bias")
        out[f"blocks.{i}.attn.v_bias"] = out.pop(p + "value.bias")
    return out


def test_parity_with_transformers() -> None:
    hf = hf_classifier(num_labels=7, layer_norm_eps=1e-6)
    hf.fc_norm.eps = 1e-6
    ours = create_model("videomae_test", num_classes=7).eval()
    ours.load_state_dict(_hf_to_original(hf.state_dict()), strict=True)
    x = clip()
    with torch.no_grad():
        tokens = hf.videomae(pixel_values=x.transpose(1, 2)).last_hidden_state
        hf_features = hf.fc_norm(tokens.mean(1))
        hf_logits = hf(pixel_values=x.transpose(1, 2)).logits
        features, logits = ours.forward_features_and_logits(x)
    torch.testing.assert_close(features, hf_features, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits, hf_logits, rtol=0, atol=1e-5)

"""Session 26: an export keeps the expert importance order through an import."""

import torch
from helpers import tiny_model

from elastic_moe.hf import export_hf, extract, import_hf
from elastic_moe.spec import SubModelSpec


def test_exported_experts_are_written_most_important_first(tmp_path):
    model = tiny_model()
    gen = torch.Generator().manual_seed(3)
    for i in model.moe_layers:
        model.moe(i).expert_order.copy_(torch.randperm(model.cfg.moe_num_experts, generator=gen))
    export_hf(model, tmp_path / "hf")
    back = import_hf(tmp_path / "hf")
    x = torch.randint(0, model.cfg.vocab_size, (2, 12), generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, model(x).logits, rtol=0, atol=1e-5)  # permuting experts changes no output
        for m in (2, 3, 6):  # the imported model's "first m experts" are the original model's
            spec = SubModelSpec(experts=m)
            torch.testing.assert_close(back(x, spec=spec).logits, model(x, spec=spec).logits, rtol=0, atol=1e-5)
    sub = extract(model, SubModelSpec(experts=5))
    for i in sub.moe_layers:  # its experts are stored in importance order already
        assert sub.moe(i).expert_order.tolist() == list(range(5))
    with torch.no_grad():
        torch.testing.assert_close(sub(x).logits, model(x, spec=SubModelSpec(experts=5)).logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(sub(x, spec=SubModelSpec(experts=2)).logits,
                                   model(x, spec=SubModelSpec(experts=2)).logits, rtol=0, atol=1e-5)

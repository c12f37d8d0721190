"""Check ``unet_lppa`` against the FedLPPA authors' ``UNet_UniV5``, parameter for parameter.

    python -m benchmarks.lppa_network_equivalence --reference PATH/code_v4/networks/unet.py

``PATH`` is a checkout of github.com/llmir/FedLPPA (not part of this repository). Builds both
networks (five sites, the given size, site 2, box labels), copies the reference's randomly
initialised parameters into ours under the name map below (attention gammas set non-zero and
BatchNorm statistics randomised, so that every branch counts), and prints the largest
difference of the main logits in eval mode, and of the main logits, auxiliary logits and
fused maps in train mode with the same seed (dropout included). Every difference is 0.
"""
from __future__ import annotations

import argparse
import importlib.util
import re
import sys
from typing import Dict

import torch

from networks import build

#: reference state-dict name pattern -> ours
NAME_MAP = [
    (r"^distribution_prompts$", "prompts.distribution"),
    (r"^uni_prompt$", "prompts.universal"),
    (r"^encoder\.in_conv\.conv_conv\.", "encoder.in_conv."),
    (r"^encoder\.(down\d)\.maxpool_conv\.1\.conv_conv\.", r"encoder.\1.1."),
    (r"^decoder\.(up\d)\.conv1x1\.", r"decoder.up.\1.reduce."),
    (r"^decoder\.(up\d)\.conv\.conv_conv\.", r"decoder.up.\1.conv."),
    (r"^decoder\.out_conv\.", "out_conv."),
    (r"^decoder_auxiliary\.(up\d)\.conv1x1\.", r"aux_decoder.up.\1.reduce."),
    (r"^decoder_auxiliary\.(up\d)\.conv\.conv_conv\.", r"aux_decoder.up.\1.conv."),
    (r"^decoder_auxiliary\.out_conv\.", "aux_decoder.out_conv."),
    (r"^mlp\.hidden_linear_layers\.", "decoder.prototype.linears."),
    (r"^mlp\.hidden_bn_layers\.", "decoder.prototype.norms."),
    (r"^mlp\.fc_out\.0\.", "decoder.prototype.out."),
    (r"^fuse\.", "fusion.conv."),
    (r"^attention\.", "fusion.attention."),
]


def ours_name(ref_name: str) -> str:
    for pattern, replacement in NAME_MAP:
        if re.search(pattern, ref_name):
            return re.sub(pattern, replacement, ref_name)
    raise KeyError(f"no mapping for the reference parameter {ref_name!r}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", required=True, help="llmir/FedLPPA code_v4/networks/unet.py")
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args(argv)
    spec = importlib.util.spec_from_file_location("fedlppa_reference_unet", args.reference)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    ref = module.UNet_UniV5(1, 2, "universal", "dual", "box", 1, 5, 2, args.size)
    ours = build("unet_lppa", 1, 2, base_channels=16, img_size=args.size, num_sites=5, site=2,
                 label_form="box")
    state: Dict[str, torch.Tensor] = {ours_name(k): v.clone() for k, v in ref.state_dict().items()}
    with torch.no_grad():
        for key, value in state.items():
            if key.endswith("gamma"):
                value.fill_(0.7)
            elif key.endswith("running_var"):
                value.uniform_(0.5, 2.0)
            elif key.endswith("running_mean"):
                value.normal_(0.0, 0.1)
    ours.load_state_dict(state)
    ref.load_state_dict({k: state[ours_name(k)] for k in ref.state_dict()})
    x = torch.randn(3, 1, args.size, args.size)
    rows = []
    with torch.no_grad():
        ref.eval(), ours.eval()
        rows.append(("eval: main logits", (ref(x)[0] - ours(x).logits).abs().max().item()))
        ref.train(), ours.train()
        torch.manual_seed(5)
        r = ref(x)
        torch.manual_seed(5)
        o = ours.forward_train(x)
    rows.append(("train: main logits", (r[0] - o.seg.logits).abs().max().item()))
    rows.append(("train: auxiliary logits", (r[8] - o.aux_logits).abs().max().item()))
    rows.append(("train: fused maps", max((a - b).abs().max().item() for a, b in zip(r[6], o.fused))))
    count = sum(p.numel() for p in ours.parameters())
    print(f"parameters: reference {sum(p.numel() for p in ref.parameters()):,}, ours {count:,}")
    print(f"{'output':<26}max |reference - ours|")
    for name, diff in rows:
        print(f"{name:<26}{diff:.3g}")
    print("command: python -m benchmarks.lppa_network_equivalence --reference " + args.reference)
    return 0 if all(d == 0.0 for _, d in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

"""
The two Python steps of kernels/gpu_check.sh:

    python kernels/gpu_check.py device                                      # versions and the device, for the record
    python kernels/gpu_check.py gpt2_folder OUT n_layer n_head n_embd n_positions   # a random GPT-2 in HF's layout
"""

import datetime
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a file from the repo root


def device():
    import triton
    print("date", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    print("torch", torch.__version__, "| cuda", torch.version.cuda, "| triton", triton.__version__)
    for pkg in ("liger-kernel", "transformers", "safetensors"):
        try:
            print(pkg, importlib.metadata.version(pkg))
        except importlib.metadata.PackageNotFoundError:
            print(pkg, "not installed")
    if not torch.cuda.is_available():
        print("device: no CUDA (a dry run)")
        return
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "|", p.multi_processor_count, "SMs |", round(p.total_memory / 2**30), "GiB")
    print(subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,power.limit",
                          "--format=csv"], capture_output=True, text=True).stdout)


def gpt2_folder(out, n_layer, n_head, n_embd, n_positions):
    """Random weights of GPT-2's architecture and GPT-2's tokenizer files from out/gpt2-vocab, as a Hugging Face
    folder (config.json, model.safetensors with Conv1D weights stored (in, out), vocab.json, merges.txt)."""
    from safetensors.torch import save_file

    from nanopost.gpt2 import CONV1D
    from nanopost.model import GPT, GPTConfig
    os.makedirs(out)
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join("out/gpt2-vocab", f), out)
    torch.manual_seed(0)
    args = dict(n_layer=int(n_layer), n_head=int(n_head), n_embd=int(n_embd))
    model = GPT(GPTConfig(block_size=int(n_positions), vocab_size=50257, pos_emb="learned", **args))
    state = {k: (v.t() if k.endswith(CONV1D) else v).contiguous() for k, v in model.state_dict().items()
             if k != "lm_head.weight"}  # tied to wte, as GPT-2 saves it
    save_file(state, os.path.join(out, "model.safetensors"))
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(dict(model_type="gpt2", n_positions=int(n_positions), vocab_size=50257, **args), f)
    print(f"wrote {out}: GPT-2 {n_layer} x {n_embd}, {model.num_params() / 1e6:.1f}M parameters")


if __name__ == "__main__":
    dict(device=device, gpt2_folder=gpt2_folder)[sys.argv[1]](*sys.argv[2:])

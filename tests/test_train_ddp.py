"""Two-process DDP on CPU (gloo): the multi-GPU path of the training module cannot rot.

Each rank reads its own, equally long share of the stream (no uneven-shard hang); DDP keeps the
trainable weights identical across ranks.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO, make_shards

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch, lightning as L
    from models.codecs import PixelCodec
    from models.iconface import IConFace, IConFaceConfig, build_backbone
    from models.id_encoder import IRBackbone, IRConfig
    from models.lora import add_lora
    from models.prompt import synthetic_prompt
    from pipelines.batches import StreamDataModule
    from pipelines.module import IConFaceModule, OptimConfig

    paths, out = json.loads(sys.argv[1]), sys.argv[2]
    torch.manual_seed(0)
    tr = build_backbone("tiny", in_channels=192)
    add_lora(tr, 4)
    net = IConFace(tr, IConFaceConfig(memory_tokens=8))
    enc = IRBackbone(IRConfig(32, (1, 1, 1, 1), (8, 8, 16, 16, 32), 512))
    module = IConFaceModule(net, PixelCodec(8), enc, synthetic_prompt(4, 96), OptimConfig(lr=1e-3))
    dm = StreamDataModule(paths, "face_classic", 0, 4, 2, (0.3, 0.3, 0.2, 0.2), 3, inline=True)
    keys = []

    class Keys(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            keys.extend(batch["keys"])

    trainer = L.Trainer(max_steps=6, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[Keys()], limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    lora = sum(float(p.detach().double().sum()) for n, p in net.named_parameters() if "lora_B" in n)
    json.dump({"rank": trainer.global_rank, "world": trainer.world_size, "keys": keys, "lora_sum": lora,
               "backend": str(torch.distributed.get_backend()) if torch.distributed.is_initialized() else None},
              open(os.path.join(out, f"rank{trainer.global_rank}.json"), "w"))
    """
)


def test_ddp_two_processes_on_cpu(tmp_path):
    paths = make_shards(tmp_path / "shards", 64, refs=2, per_shard=32, emb_dim=512)
    script = tmp_path / "ddp_train.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "REFFACE_PROGRESS": "0"}
    out = subprocess.run(
        [sys.executable, str(script), json.dumps(paths), str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))
    assert r0["world"] == r1["world"] == 2 and r0["backend"] == "gloo"
    assert len(r0["keys"]) == len(r1["keys"]) == 24  # 6 steps x batch 4 on each rank
    assert not set(r0["keys"]) & set(r1["keys"])  # disjoint shares of the stream
    assert r0["lora_sum"] == pytest.approx(r1["lora_sum"], rel=1e-6) and r0["lora_sum"] != 0.0

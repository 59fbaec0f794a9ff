"""Tiny Qwen2-VL / Qwen2.5-VL checkpoints, tokenizer and video files, built locally at test time.

Nothing is downloaded: the tokenizer is a small byte-level BPE trained here (tokenizers library)
carrying the models' special tokens and a Qwen-style chat template; the model is a tiny config
with random weights saved with save_pretrained; the video is written with PyAV. The model dims
match conf/model/tiny.yaml (Qwen2-VL) and TINY_25_OVERRIDES (Qwen2.5-VL) so plans built with
``model=tiny`` fit these checkpoints.
"""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub from the tests

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]

# The Qwen2-VL chat template's structure (default system prompt, video placeholder, generation
# prompt), written compactly for the tiny tokenizer.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "You are a helpful assistant.",
    "What happens in this video? Describe the scene in one sentence.",
    "A red square moves from the left to the right over a blue background.",
    "The camera pans slowly; a person walks across the room and opens a door.",
    "How many objects are visible, and what colour is the largest one?",
    "system user assistant video frame scene colour motion answer question",
] * 4

# Tiny model dims (conf/model/tiny.yaml mirrors them; keep the two in sync).
TINY_TEXT = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                 rope_theta=10000.0, mrope_section=[2, 3, 3])
TINY_VISION = dict(depth=2, width=32, num_heads=2, intermediate_size=64)
# Plan overrides that turn conf/model/tiny.yaml into the tiny Qwen2.5-VL below.
TINY_25_OVERRIDES = ["model.family=qwen2_5_vl", "model.name=tiny_25", "model.tokens_per_second=2"]


def build_tokenizer(vocab_size: int = TINY_TEXT["vocab_size"]):
    """A byte-level BPE with Qwen's special tokens, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 16, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=SPECIAL_TOKENS[1:])
    fast.chat_template = CHAT_TEMPLATE
    assert len(fast) <= vocab_size, len(fast)
    return fast


def build_image_processor():
    """The model's own image processor (PIL backend: no torchvision on CPU machines) with tiny
    pixel bounds; the runtime reuses its resize/rescale/normalize settings for video frames."""
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(size={"shortest_edge": 28 * 28, "longest_edge": 28 * 28 * 1024})


def tiny_config(family: str, tokenizer):
    """A tiny HF config whose special token ids come from the tokenizer."""
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    t = TINY_TEXT
    text = dict(vocab_size=t["vocab_size"], hidden_size=t["hidden_size"], intermediate_size=t["intermediate_size"],
                num_hidden_layers=t["num_hidden_layers"], num_attention_heads=t["num_attention_heads"],
                num_key_value_heads=t["num_key_value_heads"], max_position_embeddings=t["max_position_embeddings"],
                rope_parameters={"rope_type": "default", "rope_theta": t["rope_theta"],
                                 "mrope_section": list(t["mrope_section"])},
                bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
                eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"))
    v = TINY_VISION
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig as cls
        vision = dict(depth=v["depth"], hidden_size=v["width"], num_heads=v["num_heads"],
                      intermediate_size=v["intermediate_size"], out_hidden_size=t["hidden_size"],
                      window_size=56, fullatt_block_indexes=[1], tokens_per_second=2)
    else:
        from transformers import Qwen2VLConfig as cls
        vision = dict(depth=v["depth"], embed_dim=v["width"], num_heads=v["num_heads"],
                      mlp_ratio=v["intermediate_size"] // v["width"], hidden_size=t["hidden_size"])
    return cls(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)


def build_checkpoint(path: str | Path, family: str = "qwen2_vl", seed: int = 0) -> Path:
    """Save a tiny model + processor to ``path`` (a directory AutoProcessor/from_pretrained can read)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = tiny_config(family, tokenizer)
    # Larger-than-default init spreads the logits so greedy argmax has clear winners (no near-ties
    # that rounding could flip between two exact computations).
    config.text_config.initializer_range = 0.15
    config.vision_config.initializer_range = 0.1
    torch.manual_seed(seed)
    cls = Qwen2_5_VLForConditionalGeneration if family == "qwen2_5_vl" else Qwen2VLForConditionalGeneration
    model = cls(config).eval()
    model.save_pretrained(path)
    # Processing files as a Qwen checkpoint has them: tokenizer (with the chat template) and the
    # image processor config. (The Qwen2VLProcessor class itself needs torchvision, which has no
    # CPU build here; the runtime loads the parts when the processor cannot be built.)
    tokenizer.save_pretrained(path)
    build_image_processor().save_pretrained(path)
    return path


def write_video(path: str | Path, frames: int = 8, height: int = 56, width: int = 84, fps: int = 4,
                seed: int = 0, codec: str = "mpeg4") -> Path:
    """A small video: moving colour blocks over noise (content varies per frame and per pixel)."""
    import av
    import numpy as np

    rng = np.random.default_rng(seed)
    path = Path(path)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            img = rng.integers(0, 64, size=(height, width, 3), dtype=np.uint8)
            x = (i * 7) % max(1, width - 16)
            img[8:24, x:x + 16] = (220, 40, 40)
            img[height // 2:, :, 2] = np.uint8(40 + (i * 23) % 200)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


# -- plans and inputs for the tiny models ---------------------------------------------------------
QUESTION = "What happens in this video?"


def tiny_inputs(checkpoint: str | Path, video: str | Path, frames: int, family: str, question: str = QUESTION,
                fps: float = 2.0):
    """Processor inputs for the tiny checkpoint (plan-independent: default tiny pixel bounds)."""
    from spava_plan.runtime.hf import inputs as hf_inputs
    from spava_plan.runtime.video_io import read_frames

    pixels, _ = read_frames(str(video), frames)
    proc = hf_inputs.load_processing(str(checkpoint))
    return hf_inputs.build_inputs(proc, pixels, question, family=family, min_pixels=28 * 28,
                                  max_pixels=28 * 28 * 16384, temporal_patch=2, merge=2, fps=fps)


def tiny_overrides(inputs, family: str, gpus: int, frames: int, resolution: str, *extra: str,
                   fps: float = 2.0) -> list[str]:
    """Config overrides for the tiny model whose prompt counts are those of ``inputs`` (as a user
    would set video.system_tokens / video.max_question_tokens for their tokenizer and question)."""
    from spava_plan.planner.layout import ASSISTANT_SUFFIX_TOKENS

    context = inputs.video_start + inputs.video_tokens + 1
    question = inputs.total_tokens - context - ASSISTANT_SUFFIX_TOKENS
    overrides = ["model=tiny", f"gpus={gpus}", f"frames={frames}", f"video.resolution={resolution}",
                 f"video.system_tokens={inputs.video_start}", f"video.max_question_tokens={question}", f"video.fps={fps}",
                 "dtype=fp32", "kernels=false", *extra]
    if family == "qwen2_5_vl":
        overrides += TINY_25_OVERRIDES
    return overrides


def tiny_plan(inputs, family: str, gpus: int, frames: int, resolution: str, *extra: str, fps: float = 2.0):
    """A plan for the tiny model fitting ``inputs`` (see tiny_overrides)."""
    from spava_plan.hydra_conf import compose_config
    from spava_plan.planner.build import build_plan

    return build_plan(compose_config(tiny_overrides(inputs, family, gpus, frames, resolution, *extra, fps=fps)))


def local_video_rows(inputs, index):
    """Rows of the whole video's embeddings at the video tokens among global tokens ``index``
    (a tensor), in that order: what a rank with local sequence ``index`` must end up with.
    (Row = how many video tokens precede the token: InternVL3's frame text lies between tiles.)"""
    import torch

    is_video = inputs.input_ids[0] == inputs.video_token_id
    row = torch.cumsum(is_video.long(), 0) - 1
    return row[index][is_video[index]]


def dist_env(rank: int, world: int, port: int) -> dict:
    """What torchrun sets for one worker (gloo on CPU). One thread, while the test process runs
    with at least two, and (conftest.py) another ATen/MKL kernel level: results computed here
    differ from the test process's in the last bits, so compare them with a tolerance."""
    env = dict(os.environ)
    env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_VERBOSITY="error")
    return env


def launch(argv_for_rank, world: int, cwd: str | Path, timeout: float = 180.0) -> list:
    """Start ``world`` processes as torchrun would (RANK/WORLD_SIZE/MASTER_* set), wait for all;
    returns [(returncode, stdout, stderr)] per rank. A process still running at ``timeout`` is killed
    (the caller's assertion then fails instead of the test session hanging)."""
    import subprocess
    import sys

    from spava_plan.runtime.comm.dist import free_port

    port = free_port()
    # -X faulthandler: a worker killed by a signal (an abort in native code) prints every thread's
    # Python stack to its stderr, which the caller's assertion message shows.
    procs = [subprocess.Popen([sys.executable, "-X", "faulthandler", *argv_for_rank(r)], cwd=str(cwd),
                              env=dist_env(r, world, port),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)]
    out = []
    for p in procs:
        try:
            so, se = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            so, se = p.communicate()
            se += "\n<killed: timeout>"
        out.append((p.returncode, so, se))
    return out


def exactness_worker(work: str, families: str, max_new_tokens: int, backend: str = "torch",
                     dtype: str = "float64") -> None:
    """One rank of the gloo exactness test: frame-parallel ViT, prefill logits of every local row,
    and greedy tokens under the plan in ``work``/<family>/plan_W<W>.json, saved for the parent.
    backend="triton" loads the kernels the parent rendered into <family>/kernels_W<W>."""
    import torch

    from spava_plan.plan_load import load_plan
    from spava_plan.runtime.hf import attention as hf_attention, inputs as hf_inputs, model as hf_model
    from spava_plan.runtime.attention import RankAttention
    from spava_plan.runtime.backends.torch_ref import TorchBackend
    from spava_plan.runtime.comm.dist import TorchDistComm
    from spava_plan.runtime.generate import RankRunner

    comm = TorchDistComm.from_env(backend="gloo", timeout_s=120)
    W, rank = comm.world_size, comm.rank
    try:
        for family in families.split(","):
            root = Path(work) / family
            plan = load_plan(root / f"plan_W{W}.json")
            inputs = torch.load(root / "inputs.pt", weights_only=False)
            model = hf_attention.install(hf_model.load_checkpoint(str(root / "ckpt"), dtype=getattr(torch, dtype),
                                                                  device="cpu"))
            positions = hf_inputs.global_position_ids(model, inputs)
            if backend == "triton":
                from spava_plan.codegen import render_kernels
                from spava_plan.runtime.backends.triton_gen import TritonBackend

                kernels = TritonBackend(root / f"kernels_W{W}", plan_hash=plan.hash,
                                        render=functools.partial(render_kernels, plan))
            else:
                kernels = TorchBackend()
            runner = RankRunner(model, plan, comm, lambda: RankAttention(plan, rank, comm, kernels), "cpu")
            with torch.inference_mode():
                video = runner.vision(inputs)
                pre = runner.prefill(inputs, positions, video)
                logits = runner.logits(pre.hidden)
                result = runner.generate(inputs, positions, max_new_tokens)
            torch.save({"video": video, "index": pre.index, "logits": logits, "tokens": result.tokens},
                       root / f"out_{backend}_W{W}_rank{rank}.pt")
            print(f"rank {rank}: {family} saved", file=sys.stderr, flush=True)
    except BaseException:
        comm.close()
        raise
    # As spava-run's ranks do: agree that every rank is done before tearing the group down (rank 0
    # hosts the store), then leave without interpreter teardown, as runtime/launch.py's workers do
    # (a teardown abort in gloo's threads once turned a finished run into exit code -6). A crash
    # before this point prints every thread's stack (launch() runs workers with -X faulthandler).
    comm.barrier()
    comm.close()
    print(f"rank {rank}: closed", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(0)


# -- tiny InternVL3 ---------------------------------------------------------------------------------
# Special tokens of InternVL3's tokenizer (Qwen2's plus the image markers); the processor writes
# every frame as "Frame{i}: <img>" + <IMG_CONTEXT> x tile_tokens + "</img>".
INTERNVL_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>",
                           "<video>"]
# Qwen2's pre-tokenizer pattern (its tokenizer.json): numbers split into single digits, a newline
# never joins the word after it. The tiny InternVL tokenizer uses it so that the frame text splits
# as in the real tokenizer ("Frame", digits, ":", " ").
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
# InternVL3-hf's chat template structure: the video part renders "<video>\n" (written compactly).
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'video' %}<video>\n"
    "{% elif part['type'] == 'image' %}<IMG_CONTEXT>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY_INTERNVL_VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                            image_size=[140, 140], patch_size=[7, 7])  # conf/model/tiny_internvl3.yaml
TINY_INTERNVL_TILE, TINY_INTERNVL_TOKENS = 140, 100


def build_internvl_tokenizer(vocab_size: int = TINY_TEXT["vocab_size"]):
    """A byte-level BPE with Qwen2's pre-tokenizer and InternVL's special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 16, special_tokens=INTERNVL_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    # the words the chat template and the frame text write right after a special token or newline
    corpus = _CORPUS + ["\n".join(f"Frame{i}: " for i in range(1, 40)), "system\nuser\nassistant\n"] * 8
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=INTERNVL_SPECIAL_TOKENS[1:])
    fast.chat_template = INTERNVL_CHAT_TEMPLATE
    assert len(fast) <= vocab_size, len(fast)
    return fast


def tiny_internvl_config(tokenizer):
    """transformers' InternVLConfig with the dims of conf/model/tiny_internvl3.yaml."""
    from transformers import InternVLConfig

    t = TINY_TEXT
    text = dict(model_type="qwen2", vocab_size=t["vocab_size"], hidden_size=t["hidden_size"],
                intermediate_size=t["intermediate_size"], num_hidden_layers=t["num_hidden_layers"],
                num_attention_heads=t["num_attention_heads"], num_key_value_heads=t["num_key_value_heads"],
                max_position_embeddings=t["max_position_embeddings"], tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": t["rope_theta"]},
                bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
                eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"))
    vision = dict(TINY_INTERNVL_VISION, attention_bias=True, use_qk_norm=False, norm_type="layer_norm",
                  hidden_act="gelu", use_mean_pooling=False)
    return InternVLConfig(text_config=text, vision_config=vision,
                          image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
                          image_seq_length=TINY_INTERNVL_TOKENS, downsample_ratio=0.5, tie_word_embeddings=False)


def build_internvl_checkpoint(path: str | Path, seed: int = 0) -> Path:
    """Save a tiny InternVL model, its tokenizer and image processor to ``path``."""
    import torch
    from transformers import InternVLForConditionalGeneration

    from spava_plan.runtime.hf.internvl_inputs import internvl_image_processor

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_internvl_tokenizer()
    config = tiny_internvl_config(tokenizer)
    config.text_config.initializer_range = 0.15  # spread the logits: no near-ties for greedy argmax
    config.vision_config.initializer_range = 0.1
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    internvl_image_processor(TINY_INTERNVL_TILE).save_pretrained(path)
    return path


def tiny_internvl_inputs(checkpoint: str | Path, video: str | Path, frames: int, question: str = QUESTION):
    """Processor inputs (one 140x140 tile per frame) for the tiny InternVL checkpoint."""
    from spava_plan.runtime.hf import inputs as hf_inputs
    from spava_plan.runtime.video_io import read_frames

    pixels, _ = read_frames(str(video), frames)
    proc = hf_inputs.load_processing(str(checkpoint))
    return hf_inputs.build_inputs(proc, pixels, question, family="internvl3", min_pixels=0, max_pixels=0,
                                  temporal_patch=1, merge=2, fps=2.0, tile_size=TINY_INTERNVL_TILE,
                                  tile_tokens=TINY_INTERNVL_TOKENS)


def tiny_internvl_plan(inputs, gpus: int, frames: int, *extra: str):
    """A plan for the tiny InternVL fitting ``inputs`` (system and question lengths from the prompt)."""
    from spava_plan.hydra_conf import compose_config
    from spava_plan.planner.build import build_plan
    from spava_plan.planner.layout import ASSISTANT_SUFFIX_TOKENS

    question = inputs.total_tokens - inputs.context_tokens - ASSISTANT_SUFFIX_TOKENS
    return build_plan(compose_config(["model=tiny_internvl3", f"gpus={gpus}", f"frames={frames}",
                                      f"video.system_tokens={inputs.video_start}",
                                      f"video.max_question_tokens={question}", "dtype=fp32", "kernels=false", *extra]))

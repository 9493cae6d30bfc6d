"""Command line: python -m sana_core generate --prompt ... --transformer FILE --vae FILE
--text-encoder PATH --out image.png [options]. Bad input (missing file, wrong file, bad size)
exits with status 2 and a one-line message; the seed and settings go into the PNG's text chunks.
python -m sana_core quantize IN OUT --format fp8|q8_0|q5_0|q4_0 writes a quantized DiT file."""
import argparse
import json
import sys
from pathlib import Path

from .fp8 import FP8_COMPUTE  # --dtype for the DiT only; the others then run in auto

DTYPES = {"auto": None, "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sana_core", description="SANA text-to-image.")
    commands = parser.add_subparsers(dest="command", required=True)
    g = commands.add_parser("generate", help="make an image from a prompt",
                            description="Make an image from a prompt with the SANA DiT, DC-AE and Gemma-2 files.")
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--transformer", required=True, type=Path, help="DiT file or diffusers folder")
    g.add_argument("--vae", required=True, type=Path, help="DC-AE file or diffusers folder")
    g.add_argument("--text-encoder", required=True, type=Path, help="Gemma-2 folder or ComfyUI single file")
    g.add_argument("--out", required=True, type=Path, help="PNG to write (name_1.png, ... for a batch)")
    g.add_argument("--width", type=int, help="multiple of 32 (with --height); default: the model's size")
    g.add_argument("--height", type=int)
    g.add_argument("--aspect-ratio", help="e.g. 16:9: the nearest size the model was trained at")
    g.add_argument("--steps", type=int, help="default: 20 (flow_dpm_solver), 28 (flow_euler), 2 (scm)")
    g.add_argument("--cfg", type=float, help="guidance scale (default 4.5)")
    g.add_argument("--pag-scale", type=float, help="perturbed-attention guidance (default 0 = off; 2.0 typical)")
    g.add_argument("--shift", type=float, help="flow shift (default per model: 3.0, 4.0 for 0.6B, 6.0 for 4K)")
    g.add_argument("--sampler", choices=("flow_dpm_solver", "flow_euler", "scm"),
                   help="default: flow_dpm_solver, scm for Sana-Sprint")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch-size", type=int, default=1)
    g.add_argument("--image", type=Path, help="input image for image-to-image (with --denoise < 1)")
    g.add_argument("--denoise", type=float, default=None, help="image-to-image strength (default 0.6 with --image)")
    g.add_argument("--dtype", choices=tuple(DTYPES) + (FP8_COMPUTE,), default="auto",
                   help=f"default: bf16 on a GPU, fp32 on the CPU; {FP8_COMPUTE}: the DiT's matmuls in fp8 (GPUs "
                        "with fp8 tensor cores; faster, less accurate), the rest auto")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: the GPU if there is one)")
    q = commands.add_parser("quantize", help="write a DiT checkpoint as fp8 or GGUF",
                            description="Write a bf16/fp16/fp32 SANA DiT checkpoint (any layout) with the blocks' "
                                        "Linear and 1x1-conv weights quantized: fp8 = ComfyUI's scaled fp8 "
                                        "(.safetensors), q8_0 / q5_0 / q4_0 = GGUF (.gguf).")
    q.add_argument("source", type=Path, help="DiT file or diffusers folder")
    q.add_argument("out", type=Path, help="file to write: .safetensors for fp8, .gguf for the others")
    q.add_argument("--format", required=True, choices=("fp8", "q8_0", "q5_0", "q4_0"))
    q.add_argument("--resolution", type=int, choices=(2048, 4096),
                   help="for 2K/4K models whose file does not tell (stored in the output's metadata)")
    return parser


class UserError(Exception):
    """Input the user must change: printed as one line, exit status 2."""


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .checkpoints import CheckpointError
    try:
        return quantize(args) if args.command == "quantize" else generate(args)
    except (UserError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def generate(args) -> int:
    for flag, path in (("--transformer", args.transformer), ("--vae", args.vae),
                       ("--text-encoder", args.text_encoder), ("--image", args.image)):
        if path is not None and not path.exists():
            raise UserError(f"{flag}: no such file or folder: {path}")
    if args.out.suffix.lower() != ".png":
        raise UserError(f"--out must name a .png file (the settings are stored in its text chunks), got {args.out}")

    import torch
    from tqdm import tqdm

    from . import load_autoencoder, load_text_encoder, load_transformer
    from .pipeline import SanaPipeline

    device = None if args.device == "auto" else torch.device(args.device)
    if device is not None and device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: no CUDA GPU is available here (use --device cpu)")
    dtype = DTYPES.get(args.dtype) and getattr(torch, DTYPES[args.dtype])
    image = None
    if args.image is not None:
        from PIL import Image
        image = Image.open(args.image).convert("RGB")
    denoise = args.denoise if args.denoise is not None else (0.6 if image is not None else 1.0)

    transformer = load(load_transformer, "--transformer", args.transformer,
                       FP8_COMPUTE if args.dtype == FP8_COMPUTE else dtype, device)
    autoencoder = load(load_autoencoder, "--vae", args.vae, dtype, device)
    text_encoder = load(load_text_encoder, "--text-encoder", args.text_encoder, dtype, device)
    pipe = SanaPipeline(transformer, autoencoder, text_encoder)
    settings = pipe.resolve_settings(width=args.width, height=args.height, aspect_ratio=args.aspect_ratio,
                                     steps=args.steps, cfg=args.cfg, pag_scale=args.pag_scale, flow_shift=args.shift,
                                     sampler=args.sampler, image=image)

    with tqdm(total=settings["steps"], desc="sampling", unit="step", file=sys.stderr) as bar:
        def progress(step, total, x0):
            bar.total = total
            bar.update(step - bar.n)

        images = pipe(args.prompt, args.negative_prompt, width=settings["width"], height=settings["height"],
                      steps=settings["steps"], cfg=settings["cfg"], pag_scale=settings["pag_scale"],
                      flow_shift=settings["shift"], sampler=settings["sampler"], seed=args.seed,
                      batch_size=args.batch_size, image=image, denoise=denoise, callback=progress)

    record = dict(prompt=args.prompt, negative_prompt=args.negative_prompt, seed=args.seed, denoise=denoise,
                  model=transformer.config.variant, transformer=args.transformer.name, vae=args.vae.name,
                  text_encoder=args.text_encoder.name, **settings)
    record["pag_layers"] = list(settings["pag_layers"]) if settings["pag_scale"] else []
    for index, image in enumerate(images):
        path = args.out if len(images) == 1 else args.out.with_name(f"{args.out.stem}_{index + 1}{args.out.suffix}")
        save_png(image, path, dict(record, batch_index=index, batch_size=len(images)))
        print(path)
    return 0


def quantize(args) -> int:
    if not args.source.exists():
        raise UserError(f"no such file or folder: {args.source}")
    from .quantized_files import quantize_checkpoint
    hints = {} if args.resolution is None else {"resolution": args.resolution}
    print(json.dumps(quantize_checkpoint(args.source, args.out, args.format, **hints)))
    return 0


def load(loader, flag, path, dtype, device):
    from .checkpoints import CheckpointError
    try:
        return loader(path, dtype=dtype, device=device)
    except CheckpointError as e:
        raise UserError(f"{flag} {path}: {e}") from None


def save_png(image, path: Path, record: dict) -> None:
    """PNG with the settings as text: 'parameters' (readable, A1111 style) and 'sana' (JSON)."""
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    readable = (f"{record['prompt']}\nNegative prompt: {record['negative_prompt']}\n"
                f"Steps: {record['steps']}, Sampler: {record['sampler']}, CFG scale: {record['cfg']}, "
                f"Seed: {record['seed']}, Size: {record['width']}x{record['height']}, Model: {record['model']}, "
                f"Flow shift: {record['shift']}, PAG scale: {record['pag_scale']}, "
                f"Batch index: {record['batch_index']}")
    info.add_text("parameters", readable)
    info.add_text("sana", json.dumps(record))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, pnginfo=info)


if __name__ == "__main__":
    sys.exit(main())

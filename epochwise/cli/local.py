"""``epochwise export`` and ``epochwise sample``: use a local epoch's model (torch loads only when run)."""

from __future__ import annotations

from pathlib import Path

import typer

from epochwise.cli.common import console, fail_lines, friendly_errors

EpochOption = typer.Option("best", "--epoch", "-e", help="Epoch number, or 'best' (lowest validation loss).")
RunOption = typer.Option(None, "--run", help="Run key under <fold>/local/ (default: the latest trained run).")


def export(
    fold: Path = typer.Argument(..., help="Fold directory trained with --backend local."),
    epoch: str = EpochOption,
    out: Path = typer.Option(..., "--out", "-o", help="Directory to write the model to."),
    merged: bool = typer.Option(True, "--merged/--adapter", help="Merged full model, or the LoRA adapter only."),
    run: str | None = RunOption,
) -> None:
    """Write a local epoch's model (merged into the base, or the adapter) and its tokenizer to --out."""
    from epochwise.local.export import export_epoch

    with friendly_errors():
        metrics = _pick(fold, epoch, run)
        path = export_epoch(metrics, out, merged)
    kind = "merged model" if merged else "adapter"
    console.print(f"epoch {metrics['epoch']} ({kind}, val loss {metrics['val_loss']}) -> {path}")


def sample(
    fold: Path = typer.Argument(..., help="Fold directory trained with --backend local."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="User message to answer."),
    epoch: str = EpochOption,
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, help="Tokens to generate."),
    run: str | None = RunOption,
) -> None:
    """Generate a reply from a local epoch's model (greedy), to check what it learned."""
    from epochwise.local.export import sample_epoch

    with friendly_errors():
        metrics = _pick(fold, epoch, run)
        reply = sample_epoch(metrics, prompt, max_new_tokens)
    for line in reply_lines(metrics["epoch"], prompt, reply):
        console.print(line, markup=False, soft_wrap=True)


def reply_lines(epoch: int, prompt: str, reply: str) -> list[str]:
    """A label naming the epoch and the prompt, then the reply. A reply of only whitespace (the random
    ``tiny`` model often generates nothing but newlines) is shown escaped with a note, not as blank lines;
    runs of blank lines in a reply are squeezed to one."""
    label = f"epoch {epoch} reply to {prompt[:60]!r}{'...' if len(prompt) > 60 else ''}:"
    if not reply:
        return [label, "(empty reply: the model generated only special tokens)"]
    if not reply.strip():
        shown = repr(reply[:40]) + ("..." if len(reply) > 40 else "")
        return [label, f"(no text: {len(reply)} whitespace character(s), {shown})"]
    lines: list[str] = []
    for line in reply.strip("\n").splitlines():
        if line.strip() or (lines and lines[-1].strip()):
            lines.append(line)
    return [label, *lines]


def _pick(fold: Path, epoch: str, run: str | None) -> dict:
    """The finished local epoch's metrics (``best`` or a number); a clear error when there is none."""
    from epochwise.local.export import pick_epoch

    try:
        return pick_epoch(fold, epoch, run)
    except ValueError as exc:
        fail_lines([str(exc)])


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.command()(export)
    app.command()(sample)

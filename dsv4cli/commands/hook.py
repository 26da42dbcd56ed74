"""`dsv4 hook install|uninstall`: a plain git pre-commit hook running `dsv4 review --staged`,
for repositories that do not use the pre-commit framework (which uses
.pre-commit-hooks.yaml instead).

The script carries a signature line, so uninstall removes only a hook we wrote, and install
replaces a foreign hook only with --force (keeping it aside, and uninstall puts it back).
The hooks directory is git's own answer (`git rev-parse --git-path hooks`), which honours
core.hooksPath and worktrees.
"""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import sys
from pathlib import Path

import typer

from dsv4cli import render
from dsv4cli.errors import EXIT_USAGE, CliError

SIGNATURE = "# dsv4-review-hook: installed by `dsv4 hook install`; `dsv4 hook uninstall` removes it"
HOOK_NAME = "pre-commit"
BACKUP_SUFFIX = ".dsv4-backup"
SEVERITIES = ("info", "warning", "error")


def hooks_dir(start: Path) -> Path:
    import git

    try:
        repo = git.Repo(start, search_parent_directories=True)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError):
        raise CliError(f"not a git repository: {start}", "run dsv4 hook inside a git repository") from None
    base = Path(repo.working_tree_dir or repo.git_dir)
    relative = repo.git.rev_parse("--git-path", "hooks")
    return (base / relative).resolve() if not os.path.isabs(relative) else Path(relative)


def hook_script(review_args: list[str]) -> str:
    """The hook: `dsv4` from PATH when there is one, else the interpreter dsv4 was installed in
    (GUI git clients often run hooks with a short PATH)."""
    args = " ".join(shlex.quote(arg) for arg in ["review", "--staged", *review_args])
    fallback = f"{shlex.quote(sys.executable)} -m dsv4cli.app"
    return (
        "#!/bin/sh\n"
        f"{SIGNATURE}\n"
        "# Reviews the staged changes with a local model. Advisory unless --fail-on is set;\n"
        "# skip once with `git commit --no-verify` or SKIP=dsv4-review.\n"
        'case ",${SKIP:-}," in *,dsv4-review,*) exit 0 ;; esac\n'
        "if command -v dsv4 >/dev/null 2>&1; then\n"
        f"    exec dsv4 {args}\n"
        "fi\n"
        f"exec {fallback} {args}\n"
    )


def is_ours(path: Path) -> bool:
    try:
        return SIGNATURE in path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False


def install(start: Path, *, force: bool, review_args: list[str]) -> Path:
    directory = hooks_dir(start)
    hook = directory / HOOK_NAME
    backup = directory / (HOOK_NAME + BACKUP_SUFFIX)
    if hook.exists() or hook.is_symlink():
        if not is_ours(hook):
            if not force:
                raise CliError(f"a pre-commit hook already exists: {hook}",
                               f"dsv4 did not write it; --force replaces it, keeping it as {backup.name} "
                               "for 'dsv4 hook uninstall' to restore")
            if backup.exists():
                raise CliError(f"{backup} already exists", "move it away first; it may be an older hook")
            os.replace(hook, backup)
    directory.mkdir(parents=True, exist_ok=True)
    temporary = directory / (HOOK_NAME + ".dsv4-tmp")
    temporary.write_text(hook_script(review_args), encoding="utf-8")
    temporary.chmod(temporary.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH | stat.S_IRUSR)
    os.replace(temporary, hook)
    return hook


def uninstall(start: Path) -> tuple[Path, bool] | None:
    """Remove our hook; put back the one --force replaced. None when there was none of ours."""
    directory = hooks_dir(start)
    hook = directory / HOOK_NAME
    backup = directory / (HOOK_NAME + BACKUP_SUFFIX)
    if not hook.exists():
        return None
    if not is_ours(hook):
        raise CliError(f"{hook} was not installed by dsv4", "it is left as it is; remove it yourself if you mean to")
    hook.unlink()
    restored = backup.exists()
    if restored:
        os.replace(backup, hook)
    return hook, restored


def register(app: typer.Typer) -> None:
    hook_app = typer.Typer(
        help="Install or remove a git pre-commit hook that runs 'dsv4 review --staged'.",
        no_args_is_help=True,
        rich_markup_mode=None,
    )

    @hook_app.command("install")
    def install_command(
        force: bool = typer.Option(False, "--force", help="Replace a pre-commit hook dsv4 did not write (kept aside)."),
        fail_on: str = typer.Option(None, "--fail-on", metavar="info|warning|error",
                                    help="Block the commit on findings this severe (default: advisory)."),
        timeout: float = typer.Option(None, "--timeout", min=0.0, metavar="SECONDS",
                                      help="Time budget for each review."),
        model: str = typer.Option(None, "--model", "-m", help="Model for the hook (default: the configured one)."),
    ) -> None:
        """Write .git/hooks/pre-commit (or core.hooksPath) to review each commit."""
        review_args: list[str] = []
        if fail_on is not None:
            if fail_on.lower() not in SEVERITIES:
                raise CliError(f"--fail-on must be one of {', '.join(SEVERITIES)}, not {fail_on!r}",
                               "see 'dsv4 hook install --help'", exit_code=EXIT_USAGE)
            review_args += ["--fail-on", fail_on.lower()]
        if timeout is not None:
            review_args += ["--timeout", f"{timeout:g}"]
        if model is not None:
            review_args += ["--model", model]
        hook = install(Path.cwd(), force=force, review_args=review_args)
        if shutil.which("dsv4") is None:
            render.note(f"dsv4 is not on PATH; the hook runs it with {sys.executable}")
        render.note(f"installed {hook}: each commit runs 'dsv4 review --staged"
                    f"{' ' + ' '.join(review_args) if review_args else ''}'")

    @hook_app.command("uninstall")
    def uninstall_command() -> None:
        """Remove the hook 'dsv4 hook install' wrote (and only that one)."""
        result = uninstall(Path.cwd())
        if result is None:
            render.note("no pre-commit hook is installed; nothing to remove")
            return
        hook, restored = result
        render.note(f"removed {hook}" + ("; the previous hook is back in place" if restored else ""))

    app.add_typer(hook_app, name="hook")

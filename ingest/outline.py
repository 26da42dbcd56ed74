"""The reduced form of a file: its definitions and signatures, for when the full text does not fit.

Python is read with `ast` (decorators, def/class headers with full signatures, the first line of
each docstring). Other languages keep the lines that declare things, found by per-language
patterns; Markdown keeps its headings. Files with nothing recognisable keep their first lines.
The result depends only on (path, text), so it is as stable as the file itself.
"""

from __future__ import annotations

import ast
import re

HEAD_LINES = 20          # kept from files without recognisable definitions
MAX_LINE_CHARS = 240     # a declaration line longer than this is cut
MAX_OUTLINE_LINES = 2000

_LANGUAGE_BY_EXTENSION = {
    "py": "python", "pyi": "python", "pyw": "python",
    "js": "js", "mjs": "js", "cjs": "js", "jsx": "js", "ts": "js", "tsx": "js", "mts": "js", "cts": "js",
    "go": "go", "rs": "rust",
    "java": "jvm", "kt": "jvm", "kts": "jvm", "scala": "jvm", "cs": "jvm", "groovy": "jvm",
    "c": "c", "h": "c", "cc": "c", "cpp": "c", "cxx": "c", "hpp": "c", "hh": "c", "hxx": "c", "m": "c",
    "rb": "ruby", "sh": "shell", "bash": "shell", "zsh": "shell",
    "md": "markdown", "markdown": "markdown", "rst": "rst",
}

_C_NOT_A_FUNCTION = r"(?!(?:if|else|for|while|do|switch|return|case|goto|sizeof|typedef)\b)"
_PATTERNS: dict[str, re.Pattern[str]] = {
    "js": re.compile(
        r"^\s*(?:export\s+(?:default\s+)?)?(?:declare\s+)?(?:abstract\s+)?"
        r"(?:async\s+)?(?:function\*?|class|interface|enum|namespace|module|type\s+\w+)\b"
        r"|^\s*(?:export\s+)?(?:const|let|var)\s+[\w$]+\s*(?::[^=]+)?=\s*(?:async\s*)?(?:\([^)]*\)|[\w$]+)\s*(?::[^=]+)?=>"
        r"|^\s*(?:export\s+)?(?:const|let|var)\s+[\w$]+\s*=\s*(?:async\s+)?function\b"
        r"|^\s*export\s+(?:\{|\*|default\b)"
        r"|^\s+(?:(?:public|private|protected|static|readonly|async|get|set|override|abstract)\s+)*"
        r"(?!(?:if|for|while|switch|catch|return|function)\b)[\w$]+\s*(?:<[^>]*>)?\([^)]*\)\s*(?::\s*[^{;]+)?\{\s*$"
    ),
    "go": re.compile(r"^(?:func|type)\b|^(?:var|const)\s+\w+"),
    "rust": re.compile(
        r"^\s*(?:pub(?:\([\w:]+\))?\s+)?(?:(?:async|unsafe|const|extern(?:\s+\"\w+\")?)\s+)*"
        r"(?:fn|struct|enum|trait|impl|mod|type|union|macro_rules!)\b"
    ),
    "jvm": re.compile(
        r"^\s*(?:@\w+.*\s+)?(?:(?:public|private|protected|internal|static|final|abstract|sealed|open|"
        r"override|virtual|async|synchronized|suspend|data|inline|partial|readonly|extern|unsafe|new)\s+)*"
        r"(?:class|interface|enum|record|object|struct|fun|def|trait)\b"
        r"|^\s*(?:(?:public|private|protected|internal|static|final|abstract|override|virtual|async|"
        r"synchronized|extern|unsafe|new)\s+)+[\w<>\[\],.? ]+\s+\w+\s*\([^;]*$"
    ),
    "c": re.compile(
        r"^(?:struct|class|enum|union|typedef|namespace|template)\b"
        r"|^" + _C_NOT_A_FUNCTION + r"[A-Za-z_][\w\s\*&:<>,~]*?\b[\w:~]+\s*\([^;]*\)\s*(?:const)?\s*(?:\{.*)?$"
        r"|^#\s*define\s+\w+\("
    ),
    "ruby": re.compile(r"^\s*(?:def|class|module)\b"),
    "shell": re.compile(r"^\s*(?:function\s+[\w.:-]+|[\w.:-]+\s*\(\s*\))"),
    "markdown": re.compile(r"^#{1,6}\s+\S"),
}


def outline(path: str, text: str) -> str:
    """Definitions and signatures of `text` (a file at `path`), or its first lines."""
    extension = path.rpartition(".")[2].lower() if "." in path.rpartition("/")[2] else ""
    language = _LANGUAGE_BY_EXTENSION.get(extension)
    if language is None and text.startswith("#!") and ("python" in text.split("\n", 1)[0]):
        language = "python"
    lines: list[str] = []
    if language == "python":
        lines = _python_outline(text)
    elif language == "rst":
        lines = _rst_headings(text)
    elif language is not None:
        pattern = _PATTERNS[language]
        lines = [line for line in text.splitlines() if pattern.search(line)]
    lines = [_cut(line.rstrip()) for line in lines][:MAX_OUTLINE_LINES]
    if not lines:
        head = text.splitlines()
        lines = [_cut(line.rstrip()) for line in head[:HEAD_LINES]]
        if len(head) > HEAD_LINES:
            lines.append(f"... ({len(head) - HEAD_LINES} more lines)")
    return "\n".join(lines) + "\n" if lines else ""


def _cut(line: str) -> str:
    return line if len(line) <= MAX_LINE_CHARS else line[:MAX_LINE_CHARS] + " ..."


def _python_outline(text: str) -> list[str]:
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        pattern = re.compile(r"^\s*(?:@|(?:async\s+)?def\s|class\s)")
        return [line for line in text.splitlines() if pattern.match(line)]
    source = text.splitlines()
    out: list[str] = []
    docstring = ast.get_docstring(tree, clean=True)
    if docstring:
        out.append(f'"""{docstring.strip().splitlines()[0]}"""')

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                first = min([d.lineno for d in node.decorator_list] + [node.lineno])
                header_end = _header_end(node, source)
                out.extend(source[first - 1 : header_end])
                doc = ast.get_docstring(node, clean=True)
                if doc:
                    indent = " " * (node.col_offset + 4)
                    out.append(f'{indent}"""{doc.strip().splitlines()[0] if doc.strip() else ""}"""')
                if isinstance(node, ast.ClassDef):
                    visit(node.body)
            elif isinstance(node, (ast.If, ast.Try)) and node.col_offset == 0:
                # definitions under `if TYPE_CHECKING:` / `try: import` at module level
                visit(node.body)

    visit(tree.body)
    return out


def _header_end(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef, source: list[str]) -> int:
    """Last line of the def/class header (the line holding its ':')."""
    first_body = node.body[0]
    start = first_body.lineno
    if isinstance(first_body, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and first_body.decorator_list:
        start = min(d.lineno for d in first_body.decorator_list)
    if start <= node.lineno:      # `def f(): return 1` on one line
        return node.lineno
    end = start - 1
    # comments and blank lines between the header and the body are not part of the header
    while end > node.lineno and (not source[end - 1].strip() or source[end - 1].lstrip().startswith("#")):
        end -= 1
    return end




_RST_UNDERLINE = re.compile(r"^([=\-~^\"'`#*+<>_:.])\1{2,}\s*$")


def _rst_headings(text: str) -> list[str]:
    lines = text.splitlines()
    return [
        lines[i]
        for i in range(len(lines) - 1)
        if lines[i].strip() and _RST_UNDERLINE.match(lines[i + 1]) and not _RST_UNDERLINE.match(lines[i])
    ]

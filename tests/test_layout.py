"""The package's layout rules (issue 22), checked on the source: what README's "How the code is laid out" promises.

- no module imports one that imports it back (directly or around a longer circle), lazy imports included
  (imports under ``if TYPE_CHECKING:`` are for annotations only and never run);
- the chain's file names are spelled once, in beit_pipeline/pipeline/chain.py (code, not prose);
- every public function of the package is annotated; every sub-package says what it holds;
- modules log to ``getLogger(__name__)``, errors live in errors.py, run_all.sh takes its exit codes from there.
"""

import ast
import os
import re
import subprocess
import sys

from helpers import REPO

from beit_pipeline import errors
from beit_pipeline.pipeline import chain

PACKAGE = os.path.join(REPO, "beit_pipeline")
SCRIPTS = sorted(f for f in os.listdir(REPO) if f.endswith(".py"))


def package_modules() -> dict:
    """{dotted module name: path} of every module of the package."""
    found = {}
    for folder, _, names in os.walk(PACKAGE):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                found[dotted.removesuffix(".__init__")] = path
    return found


def parse(path: str) -> ast.Module:
    with open(path, encoding="utf-8") as f:
        return ast.parse(f.read(), path)


def imports_of(tree: ast.Module, modules: dict) -> set:
    """The package modules a module imports anywhere in it (top level or inside a function); not those under
    ``if TYPE_CHECKING:``, which only a type checker runs (an annotation may name a type of the caller)."""
    found, typing_only = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING":
            typing_only.update(id(n) for n in ast.walk(node))
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                found.add(name if name in modules else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name in modules}


def circles(graph: dict) -> list:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_one_that_imports_it_back():
    modules = package_modules()
    graph = {name: imports_of(parse(path), modules) - {name} for name, path in modules.items()}
    assert circles(graph) == []
    # The checker itself finds a circle, lazy imports included (labels <-> label_formats was one).
    graph["beit_pipeline.errors"] = {"beit_pipeline.cli"}
    assert circles(graph) == [["beit_pipeline.cli", "beit_pipeline.errors"]]


def test_every_sub_package_says_what_it_holds():
    for name, path in package_modules().items():
        if path.endswith("__init__.py"):
            doc = ast.get_docstring(parse(path))
            assert doc and len(doc) > 60, f"{name} has no one-paragraph docstring"


# The pieces of the chain's file names (f-strings in code); chain.py is the one place that may build them.
CHAIN_NAME_PIECES = ("prep_image_bs", "onnxsim_bs", "beit_mg_bs", "acc_bs", "fidelity_bs", "fidelity_logits_bs",
                     "beit_guide_bs", "om_emulation_bs", "keep_dtype_bs", "report_bs", "locate__bs", "run_all_state",
                     ".run_all_run", ".fidelity_derived", ".run_all_hashes", ".run_all.lock", "ais_out", "_partial",
                     "random_checkpoint.pth", "demo.json")


def name_building_strings(tree: ast.Module) -> list:
    """(line, text) of every f-string or string constant in code (not a docstring, not an argparse help or
    description) that holds a piece of a chain file name."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            body = getattr(node, "body", [])
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                skip.add(id(body[0].value))
        if isinstance(node, ast.keyword) and node.arg in ("help", "description", "epilog", "usage"):
            skip.update(id(n) for n in ast.walk(node.value))
        if isinstance(node, ast.Call) and (isinstance(node.func, ast.Attribute) and node.func.attr in (
                "info", "warning", "error", "debug") or getattr(node.func, "id", "") == "print"):
            skip.update(id(n) for n in ast.walk(node))  # log messages and printed notes name files in prose
        if isinstance(node, ast.Raise):  # so do error messages
            skip.update(id(n) for n in ast.walk(node))
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.JoinedStr):
            text = "".join(v.value for v in node.values if isinstance(v, ast.Constant))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value
        else:
            continue
        if any(piece in text for piece in CHAIN_NAME_PIECES):
            found.append((node.lineno, text))
    return found


def test_the_chains_file_names_are_spelled_only_in_chain_py():
    offenders = []
    for name, path in list(package_modules().items()) + [(s, os.path.join(REPO, s)) for s in SCRIPTS]:
        if name == "beit_pipeline.pipeline.chain":
            continue
        offenders += [f"{os.path.relpath(path, REPO)}:{line}: {text!r}" for line, text in
                      name_building_strings(parse(path))]
    assert offenders == []
    # chain.py builds every one of them, and the checker sees them there.
    built = {text for _, text in name_building_strings(parse(os.path.join(PACKAGE, "pipeline", "chain.py")))}
    assert all(any(piece in text for text in built) for piece in CHAIN_NAME_PIECES)
    with open(os.path.join(REPO, "run_all.sh"), encoding="utf-8") as f:
        text = re.sub(r"<<'EOF'\n.*?\nEOF\n", "", f.read(), flags=re.S)  # --help's text names them in prose
    code = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    assert [line for line in code if re.search(r"_bs\$\{|ais_out/bs|acc_bs\$|_bs[0-9]", line)] == []


def test_every_step_is_one_of_the_chains():
    """run_all.sh's `step NAME`, workstate's specs and its version table name the steps of chain.STEPS, in order."""
    from beit_pipeline.pipeline import workstate
    with open(os.path.join(REPO, "run_all.sh"), encoding="utf-8") as f:
        text = f.read()
    in_shell = re.findall(r"\bstep ([a-z0-9_]+) run_(?:step|eval)", text) + re.findall(r"infer=\(([a-z_]+) python3", text)
    assert set(in_shell) == set(chain.STEPS) - {"onnxsim"} and "step onnxsim onnxsim_and_check" in text
    assert list(workstate._VERSIONS) == list(chain.STEPS)
    for backend, demo in (("ort", True), ("ascend", False)):
        run = workstate.RunParams(workdir="/w", batch_size=8, backend=backend, model="m", image_path="i",
                                  label_file="l", checkpoint="c", demo=demo)
        names = list(workstate.step_specs(run))
        assert names == [step for step in chain.STEPS if step in names]


def test_the_chain_names_are_the_guides():
    files = chain.ChainFiles(8, "beit_base_patch16_224")
    assert (files.prep, files.onnx, files.onnxsim, files.graph_modify, files.om, files.outputs, files.accuracy) == (
        "prep_image_bs8", "beit_base_patch16_224.onnx", "beit_onnxsim_bs8.onnx", "beit_mg_bs8.onnx",
        "beit_mg_bs8.om", "ais_out/bs8", "acc_bs8.json")
    assert [files.is_accuracy(n) for n in ("acc_bs8.json", "acc_bs8_bf16.json", "acc_bs80.json",
                                           "acc_bs8_details.json", "acc_bs8_bf16_details.json")] == [
        True, True, False, False, False]
    tagged = chain.ChainFiles(16, "m", "_bf16")
    assert (tagged.outputs, tagged.accuracy, tagged.accuracy_details, tagged.fp32_outputs) == (
        "ais_out/bs16_bf16", "acc_bs16_bf16.json", "acc_bs16_bf16_details.json", "ais_out/bs16")
    out = subprocess.run([sys.executable, "-m", "beit_pipeline.pipeline.chain", "shell", "--workdir", "/w d",
                          "--batch_size", "8", "--model", "m", "--tag", ""],
                         capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert "prep='/w d/prep_image_bs8'\n" in out and "outputs_partial_dirname=bs8_partial\n" in out


def public_functions(tree: ast.Module):
    """Every public function and method (and __init__), with its class name or None."""
    def walk(body, owner):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if node.name == "__init__" or not node.name.startswith("_"):
                    yield owner, node
            elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                yield from walk(node.body, node.name)
    yield from walk(tree.body, None)


def unannotated(node) -> bool:
    args = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
    args = [a for a in args if a.arg not in ("self", "cls")] + [a for a in (node.args.vararg, node.args.kwarg) if a]
    return any(a.annotation is None for a in args) or (node.returns is None and node.name != "__init__")


def test_every_public_function_of_the_package_is_annotated():
    missing = [f"{os.path.relpath(path, REPO)}:{node.lineno} {owner + '.' if owner else ''}{node.name}"
               for path in package_modules().values() for owner, node in public_functions(parse(path))
               if unannotated(node)]
    assert missing == []


def test_modules_log_to_their_own_logger_and_errors_live_in_errors_py():
    for name, path in package_modules().items():
        with open(path, encoding="utf-8") as f:
            text = f.read()
        assert not re.search(r"from beit_pipeline\.cli import [^\n]*\blog\b", text), name
        assert not re.search(r"getLogger\((?!__name__\)|LOGGER_NAME\)|\"__main__\"\))", text), name
        if name != "beit_pipeline.errors":
            classes = [n.name for n in ast.walk(parse(path)) if isinstance(n, ast.ClassDef)
                       and any(getattr(b, "id", "").endswith(("Error", "Failed", "Busy", "Disagree")) or
                               getattr(b, "id", "") == "PipelineError" for b in n.bases)]
            assert classes == [], f"{name} defines {classes}: error classes belong in errors.py"


def test_run_all_takes_its_exit_codes_from_errors_py():
    with open(os.path.join(REPO, "run_all.sh"), encoding="utf-8") as f:
        text = f.read()
    literal = [line.strip() for line in text.splitlines()
               if re.search(r"\bexit [0-9]", line) and not line.lstrip().startswith("#")]
    assert len(literal) == 2 and all(line.endswith("exit 2; }") for line in literal)  # before Python can answer:
    assert "python3 is not on PATH" in literal[0] and "cannot read the exit codes" in literal[1]  # none, or broken
    assert errors.EXIT_USAGE == 2
    script = f'source "{os.path.join(REPO, "run_all.sh")}"; echo "$EXIT_USAGE $EXIT_BUSY $EXIT_SKIP $EXIT_TERMINATED"'
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True, env=env).stdout.split()
    assert out == [str(code) for code in (errors.EXIT_USAGE, errors.EXIT_BUSY, errors.EXIT_SKIP,
                                          errors.EXIT_TERMINATED)]

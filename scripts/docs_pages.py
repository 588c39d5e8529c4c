"""The docs pages written from the code, so they cannot drift from it: the unified table
(``objectives/index.md``) and one page per objective (``objectives/<name>.md``) with its row of
the table, its reference, its options and their defaults read from the class signatures, its
YAML and its API.

A MkDocs hook (``hooks:`` in ``mkdocs.yml``): :func:`on_files` adds the pages to the build as
generated files, so nothing generated is committed. ``python scripts/docs_pages.py`` prints
the objective names and their options.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass

from m3i_lightning.conf import CONF_DIR
from m3i_lightning.objectives import OBJECTIVES, Objective

PAGES_DIR = "objectives"
# Options the backbone gives every head (the factory passes them; Cls(backbone=b) too).
FROM_BACKBONE = ("embed_dim", "grid_size", "patch_size")


@dataclass(frozen=True)
class Option:
    """A keyword option of an objective class: its default and the class that declares it."""

    name: str
    default: object
    owner: str

    @property
    def shown_default(self) -> str:
        if self.name in FROM_BACKBONE:
            return "the backbone's"
        if self.default is inspect.Parameter.empty:
            return "required"
        return f"`{self.default!r}`"


def class_options(cls: type) -> list[Option]:
    """The keyword options of ``cls``: every ``__init__`` of its chain of classes that pass
    ``**kwargs`` on, in the order a reader meets them (the class's own first); the most derived
    declaration gives the default."""
    options: dict[str, Option] = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or not issubclass(klass, Objective):
            continue
        for name, parameter in inspect.signature(klass.__init__).parameters.items():
            if name in options or parameter.kind in (parameter.VAR_KEYWORD,
                                                     parameter.VAR_POSITIONAL):
                continue
            if name != "self":
                options[name] = Option(name, parameter.default, klass.__name__)
        if not any(p.kind is p.VAR_KEYWORD
                   for p in inspect.signature(klass.__init__).parameters.values()):
            break
    return list(options.values())


def summary(cls: type) -> str:
    """The first paragraph of the class docstring, on one line, its reST cross-references
    (``:class:`~a.B```) and literals (````x````) as Markdown code."""
    doc = " ".join((inspect.getdoc(cls) or "").split("\n\n")[0].split())
    doc = re.sub(r":\w+:`~?(?:[\w.]+\.)?(\w+)`", r"`\1`", doc)
    return re.sub(r"``([^`]+)``", r"`\1`", doc)


def members(cls: type) -> list[type]:
    """The classes an objective name builds: the class, or each variant of a family."""
    return list(cls.variants.values()) if "variants" in vars(cls) and cls.variants else [cls]


def input_of(cls: type) -> str:
    return f"{'masked ' if cls.masked_input else ''}{cls.input_view}"


def target_of(cls: type) -> str:
    return cls.target_view or ", ".join(sorted(cls.requires - {"geometry"})) or "–"


def form_of(cls: type) -> str:
    return " / ".join(sorted({f"{getattr(m, 'form', '?')}" for m in members(cls)}))


def teacher_of(cls: type) -> str:
    kinds = {m.uses_teacher for m in members(cls)}
    return "yes" if kinds == {True} else "no" if kinds == {False} else "by variant"


def api_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def table_page() -> str:
    """``objectives/index.md``: one row per objective."""
    rows = ["| name | class | input x (native) | target y | z_y | teacher | P̂ |",
            "|---|---|---|---|---|---|---|"]
    for name, cls in sorted(OBJECTIVES.items()):
        classes = " / ".join(f"`{m.__name__}`" for m in members(cls))
        rows.append(f"| [`{name}`]({name}.md) | {classes} | {input_of(cls)} | "
                    f"{target_of(cls)} | {cls.target_repr} | {teacher_of(cls)} | "
                    f"{form_of(cls)} |")
    return "\n".join([
        "# The unified table", "",
        "Every objective is one term `w_k · −log P̂_k(z_y | ẑ_y)` of M3I's Eq. 4: what it "
        "encodes (input x), what it predicts (target y, and `z_y`, the representation of "
        "it), whether a stop-gradient teacher gives `z_y`, and the form of `P̂` (Gaussian: a "
        "regression loss; Boltzmann: a softmax over candidates). Pick any set with "
        "`python -m m3i_lightning 'objective=[a,b,...]'`; `input=shared` (the default) makes "
        "them all read one masked view1, `input=native` gives each its reference's input.", "",
        "This page and the objective pages are generated from the classes "
        "(`scripts/docs_pages.py`): the options are their constructors'.", "",
        *rows, ""])


def options_table(cls: type) -> list[str]:
    rows = ["| option | default | declared by |", "|---|---|---|"]
    rows += [f"| `{o.name}` | {o.shown_default} | `{o.owner}` |" for o in class_options(cls)]
    return rows


def objective_page(name: str) -> str:
    """``objectives/<name>.md``."""
    cls = OBJECTIVES[name]
    family = members(cls) != [cls]
    lines = [f"# `{name}`: {cls.__name__}", "", summary(cls), "",
             "| input x (native) | target y | z_y | teacher | P̂ | data it needs |",
             "|---|---|---|---|---|---|",
             f"| {input_of(cls)} | {target_of(cls)} | {cls.target_repr} | {teacher_of(cls)} | "
             f"{form_of(cls)} | {', '.join(sorted(cls.requires)) or 'images'} |", "",
             "## Options", "",
             f"On the command line `objective.{name}.<option>=<value>` (after "
             f"`'objective=[{name},...]'`); in Python a keyword of the class. Options left "
             "null in the YAML take the class default below: the reference method's value.", ""]
    if family:
        lines += [f"`objective.{name}.variant` picks the class: "
                  + ", ".join(f"`{v}` → `{m.__name__}`" for v, m in cls.variants.items())
                  + f" (default `{cls.default_variant}`).", ""]
        for variant, member in cls.variants.items():
            lines += [f"### `variant={variant}`: {member.__name__}", "", summary(member), "",
                      *options_table(member), ""]
    else:
        lines += [*options_table(cls), ""]
    example = members(cls)[0]
    yaml = (CONF_DIR / "objective" / f"{name}.yaml").read_text().rstrip()
    lines += [f"## Config: `conf/objective/{name}.yaml`", "", "```yaml", yaml, "```", "",
              "## In Python", "", "```python", "from m3i_lightning import Backbone",
              f"from m3i_lightning.objectives import {example.__name__}", "",
              'backbone = Backbone("vit_tiny_patch16_224", img_size=32, patch_size=4)',
              f"model = {example.__name__}(backbone=backbone)  # a LightningModule: "
              "this objective alone", "```", "", "## API", ""]
    lines += [f"::: {api_path(m)}" for m in ([cls, *members(cls)] if family else [cls])]
    return "\n".join(lines) + "\n"


def pages() -> dict[str, str]:
    """Path under ``docs/`` → Markdown of every generated page."""
    generated = {f"{PAGES_DIR}/index.md": table_page()}
    generated.update({f"{PAGES_DIR}/{name}.md": objective_page(name) for name in OBJECTIVES})
    return generated


def on_files(files, config):
    """MkDocs hook: add the generated pages to the build."""
    from mkdocs.structure.files import File

    for path, content in pages().items():
        files.append(File.generated(config, path, content=content))
    return files


if __name__ == "__main__":
    for name, cls in sorted(OBJECTIVES.items()):
        for member in members(cls):
            print(name, member.__name__, [o.name for o in class_options(member)])

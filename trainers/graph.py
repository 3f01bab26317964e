"""The knowledge interaction graph of docs/method.md as data, in one place.

Four nodes: teacher image ``TI``, teacher text ``TT`` (frozen), student image ``SI``, student
text ``ST`` (trained). A learning type is a set of edges (student side first) plus the Sym
partner pairs between those edges; a strategy is a loss on one edge (or one partner pair).
Which (learning type, strategy) pairs are meaningful follows from two properties of the table
below -- self-edges and partner pairs -- so a different reading of the paper is one edit here,
and losses, search spaces and validation all follow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from trainers.errors import InputError

Node = str
Edge = tuple[Node, Node]

TEACHER_NODES: tuple[Node, ...] = ("TI", "TT")
STUDENT_NODES: tuple[Node, ...] = ("SI", "ST")
NODES: tuple[Node, ...] = TEACHER_NODES + STUDENT_NODES

# Each student node's teacher node of the same modality; teacher nodes map to themselves.
TEACHER_COUNTERPART: dict[Node, Node] = {"SI": "TI", "ST": "TT", "TI": "TI", "TT": "TT"}


@dataclass(frozen=True)
class LearningType:
    """Edges of one learning type and the Sym partner pairs between them."""

    edges: tuple[Edge, ...]
    partners: tuple[tuple[Edge, Edge], ...]

    @property
    def has_self_edge(self) -> bool:
        return any(x == y for x, y in self.edges)

    @property
    def involves_teacher(self) -> bool:
        """True when an edge touches a teacher node: students then use the teacher's width."""
        return any(node in TEACHER_NODES for edge in self.edges for node in edge)


@dataclass(frozen=True)
class Strategy:
    """Properties of a supervision strategy that decide where it is meaningful."""

    summary: str
    needs_partner: bool = False  # Sym strategies compare an edge with its partner edge
    uses_counterpart: bool = False  # compares with the edge's teacher counterpart S*
    trivial_on_self_edge: bool = False  # X = Y makes the loss constant
    uses_temperature: bool = False  # softmax over similarity rows: the loss reads t


# docs/method.md, "The knowledge interaction graph".
LEARNING_TYPE_TABLE: dict[str, LearningType] = {
    "intra_ts": LearningType(
        edges=(("SI", "TI"), ("ST", "TT")),
        partners=((("SI", "TI"), ("ST", "TT")),),
    ),
    "intra_ss": LearningType(
        edges=(("SI", "SI"), ("ST", "ST")),
        partners=((("SI", "SI"), ("ST", "ST")),),
    ),
    "inter_ts": LearningType(
        edges=(("SI", "TT"), ("ST", "TI")),
        partners=((("SI", "TT"), ("ST", "TI")),),
    ),
    "inter_ss": LearningType(edges=(("SI", "ST"),), partners=()),
}

# docs/method.md, "The six strategies".
STRATEGY_TABLE: dict[str, Strategy] = {
    "infonce": Strategy(
        "contrastive CE over sim(X, Y)/t both ways",
        trivial_on_self_edge=True,
        uses_temperature=True,
    ),
    "fd": Strategy("mean squared L2 distance of paired features", trivial_on_self_edge=True),
    "sd": Strategy(
        "mean squared difference to the teacher similarity matrix", uses_counterpart=True
    ),
    "kl": Strategy(
        "row-wise KL from the teacher similarity distribution, both ways",
        uses_counterpart=True,
        uses_temperature=True,
    ),
    "sym_sd": Strategy(
        "mean squared difference between partner similarity matrices", needs_partner=True
    ),
    "sym_kl": Strategy(
        "symmetric row-wise KL between partner similarity matrices",
        needs_partner=True,
        uses_temperature=True,
    ),
}

# How a Sym strategy reads the partner matrix Sp. For intra_ts and intra_ss both matrices of a
# pair are sample x sample with the student side first: one reading. For inter_ts the edges are
# (SI, TT) and (ST, TI): "as_written" compares S = sim(SI, TT) with Sp = sim(ST, TI) (row i:
# student text i against the teacher's images), "image_first" with Sp^T = sim(TI, ST), so both
# matrices are image x text. Only image_first keeps the teacher-student invariant: a student
# equal to its teacher is at the loss's minimum (both matrices become sim(TI, TT)); as_written
# then still compares sim(TI, TT) with its transpose. The default follows that invariant and
# the measurement in docs/method.md.
SymOrientation = Literal["image_first", "as_written"]
SYM_ORIENTATIONS: tuple[str, ...] = ("image_first", "as_written")
DEFAULT_SYM_ORIENTATION: SymOrientation = "image_first"
PARTNER_TRANSPOSED: dict[str, dict[str, bool]] = {
    "intra_ts": {"image_first": False, "as_written": False},
    "intra_ss": {"image_first": False, "as_written": False},
    "inter_ts": {"image_first": True, "as_written": False},
}

LEARNING_TYPES: tuple[str, ...] = tuple(LEARNING_TYPE_TABLE)
STRATEGIES: tuple[str, ...] = tuple(STRATEGY_TABLE)


def invalid_reason(learning_type: str, strategy: str) -> str | None:
    """Why a known pair is not meaningful, or None when it is."""
    kind = learning_type_spec(learning_type)
    spec = strategy_spec(strategy)
    if spec.needs_partner and not kind.partners:
        return f"{strategy} needs a partner edge and {learning_type} has none"
    if spec.trivial_on_self_edge and kind.has_self_edge:
        return f"{strategy} is trivial on the self-edges of {learning_type} (X = Y)"
    return None


def is_valid(learning_type: str, strategy: str) -> bool:
    """True when the pair is meaningful; False for unknown names too."""
    if learning_type not in LEARNING_TYPE_TABLE or strategy not in STRATEGY_TABLE:
        return False
    return invalid_reason(learning_type, strategy) is None


def valid_pairs() -> list[tuple[str, str]]:
    """Every meaningful pair, in LEARNING_TYPES x STRATEGIES order (20 with the table above)."""
    return [(lt, st) for lt in LEARNING_TYPES for st in STRATEGIES if is_valid(lt, st)]


def valid_strategies(learning_type: str) -> list[str]:
    return [st for st in STRATEGIES if is_valid(learning_type, st)]


def learning_type_spec(learning_type: str) -> LearningType:
    try:
        return LEARNING_TYPE_TABLE[learning_type]
    except KeyError:
        raise InputError(
            f"unknown learning type {learning_type!r}; expected one of {', '.join(LEARNING_TYPES)}"
        ) from None


def strategy_spec(strategy: str) -> Strategy:
    try:
        return STRATEGY_TABLE[strategy]
    except KeyError:
        raise InputError(
            f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}"
        ) from None


def check_pair(learning_type: str, strategy: str) -> None:
    """Raise InputError (a ValueError) naming the pair and the valid strategies for its type."""
    learning_type_spec(learning_type)
    strategy_spec(strategy)
    reason = invalid_reason(learning_type, strategy)
    if reason is not None:
        raise InputError(
            f"invalid pair {learning_type}:{strategy} ({reason}); valid strategies for "
            f"{learning_type}: {', '.join(valid_strategies(learning_type))}"
        )


def parse_pair(text: str) -> tuple[str, str]:
    """``"intra_ts:infonce"`` -> ``("intra_ts", "infonce")``, validated (InputError otherwise)."""
    learning_type, sep, strategy = text.strip().partition(":")
    if not sep or not learning_type or not strategy:
        raise InputError(
            f"pair {text!r} is not of the form learning_type:strategy "
            f"(e.g. intra_ts:infonce); learning types: {', '.join(LEARNING_TYPES)}"
        )
    check_pair(learning_type, strategy)
    return learning_type, strategy


def teacher_counterpart(edge: Edge) -> Edge:
    """Replace each student node by the teacher node of its modality: (SI, TT) -> (TI, TT)."""
    return (TEACHER_COUNTERPART[edge[0]], TEACHER_COUNTERPART[edge[1]])


def nodes_needed(learning_type: str, strategy: str) -> tuple[Node, ...]:
    """Nodes whose embeddings the pair's loss reads, in NODES order."""
    kind = learning_type_spec(learning_type)
    needed = {node for edge in kind.edges for node in edge}
    if strategy_spec(strategy).uses_counterpart:
        needed |= {node for edge in kind.edges for node in teacher_counterpart(edge)}
    return tuple(node for node in NODES if node in needed)


def partner_transposed(learning_type: str, orientation: str = DEFAULT_SYM_ORIENTATION) -> bool:
    """Whether a Sym strategy compares S with the transpose of its partner matrix."""
    if orientation not in SYM_ORIENTATIONS:
        raise InputError(
            f"sym_orientation {orientation!r}: expected one of {', '.join(SYM_ORIENTATIONS)}"
        )
    return PARTNER_TRANSPOSED.get(learning_type, {}).get(orientation, False)

"""Hypothesis: whatever a script holds, parsing and checking it either
succeeds or raises DtclError with a position inside the script; never
another exception (which the CLI would show as a traceback)."""
from hypothesis import given, settings
from hypothesis import strategies as st

from smirror.dtcl.check import check_text
from smirror.dtcl.parser import TASK_KEYS, USAGE
from smirror.errors import DtclError

WORDS = (list(USAGE) + ["start", "stop", "create", "to", "map", "base", "root", "include", "exclude",
                        "nomirror", "full", "different", "checksum", "newer", "rem", "REM", "Login",
                        "c:\\x", "d:/y", "/srv/a", "rel", "h:0", "h:70000", "[::1]:6320", "h:6400",
                        "*.tmp", "x#y", "\t", "é", "²", "12", "0", "-1", "forever", "5m"]
         + [k + "=" for k in TASK_KEYS] + list(TASK_KEYS))
TOKENS = st.one_of(
    st.sampled_from(WORDS),
    st.sampled_from([";", ",", "=", "\n", "#", "# c\n", '"', "$", "$A", "$B", "$A =", "$B =", '"s"',
                     '"c:\\\\w"', '""', '"h:1"', "1", "3"]),
    st.from_regex(r"\$[A-Za-z_][A-Za-z0-9_]{0,3}", fullmatch=True),
    st.text(max_size=4),
)


def check_only_dtcl_errors(text):
    try:
        check_text(text, "p.dtcl")
    except DtclError as exc:
        assert exc.script == "p.dtcl"
        assert exc.line >= 1 and exc.column >= 1, str(exc)
        assert exc.source_line is not None, str(exc)
        assert str(exc).startswith(f"p.dtcl:{exc.line}:{exc.column}: ")


@settings(max_examples=400, deadline=None)
@given(st.lists(TOKENS, max_size=30), st.sampled_from([" ", "\n", ""]))
def test_random_token_streams_raise_only_the_script_error(tokens, sep):
    check_only_dtcl_errors(sep.join(tokens))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(WORDS + ["$A", "$B", '"v"', "1", ","]), max_size=8),
       st.sampled_from(list(USAGE)))
def test_each_verb_with_random_arguments(args, verb):
    # defined variables and a source, so the checker gets past them to the arguments
    prelude = '$A = "h";\n$B = 2;\nlogin h u;\ntarget h;\n'
    check_only_dtcl_errors(prelude + verb + " " + " ".join(args) + ";\n")
    check_only_dtcl_errors(prelude + "$C = " + verb + " " + " ".join(args) + ";\n")


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_characters='"\n\r'), max_size=12))
def test_any_string_value_in_any_argument(value):
    # a quoted value goes through the checkers of hosts, paths, timeouts, ids and names
    v = f'"{value}"'
    for stmt in (f"login {v} u;", f"queuetask t to h onexecute={v} timeout={v};", f"disconnect {v};",
                 f"connect {v} to {v} map base {v};", f"repset create {v} root {v} exclude {v};",
                 f"status {v};", f"pausetarget {v};", f"$X = {v}; login $X $X $X $X;"):
        check_only_dtcl_errors("login h u;\n" + stmt + "\n")

"""The command-line convention (vit_jax.cli): exit codes and one-line errors."""
import subprocess
import sys
import textwrap

import pytest


def _run_command(tmp_path, body: str, *args):
  """Runs a tiny command module built on cli.run, as `python -m` would."""
  script = tmp_path / 'command.py'
  script.write_text(textwrap.dedent("""
      import signal
      from absl import flags
      from vit_jax import cli
      _N = flags.DEFINE_integer('n', 1, 'A number.')

      def main(argv):
        cli.check_no_arguments(argv)
      """) + textwrap.indent(textwrap.dedent(body), '  ') + "\ncli.run(main)\n")
  return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                        timeout=120)


@pytest.mark.parametrize('body, args, code, message', [
    ('print("ok")', [], 0, None),
    ('raise cli.UserError("bad --n=3")', [], 2, 'Error: bad --n=3'),
    ('raise ValueError("bad value")', [], 2, 'Error: bad value'),
    ('open("/nonexistent/x")', [], 2, "Error: [Errno 2] No such file or directory: '/nonexistent/x'"),
    ('pass', ['stray'], 2, 'Error: Unexpected arguments: stray'),
    ('pass', ['--n=abc'], 2, 'Error: flag --n=abc'),
    ('pass', ['--nope=1'], 2, 'Error: Unknown command line flag'),
    ('raise cli.Interrupted(signal.SIGTERM, "stopped")', [], 143, 'stopped'),
    ('raise KeyboardInterrupt', [], 130, 'Interrupted.'),
    ('raise RuntimeError("a bug")', [], 1, 'RuntimeError: a bug'),
])
def test_exit_codes_and_messages(tmp_path, body, args, code, message):
  result = _run_command(tmp_path, body, *args)
  assert result.returncode == code, result.stderr
  if message:
    assert message in result.stderr
  if code in (0, 2, 130, 143):
    assert 'Traceback' not in result.stderr
  if code == 2:
    assert len([l for l in result.stderr.splitlines() if l.startswith('Error:')]) == 1

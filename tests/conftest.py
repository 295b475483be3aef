"""Every test process sees 8 CPU devices, so sharding is tested for real."""
import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

# The files that take longest on 2 cores (a full run's --durations=0, summed per file), longest
# first: with `-n 2 --dist loadfile` a long file collected last runs alone while the other
# worker idles.
_SLOW_FILES_FIRST = ('test_train.py', 'test_bad_input.py', 'test_commands.py',
                     'test_reliability.py', 'test_multihost.py', 'test_plan.py', 'test_models.py',
                     'test_device_check.py', 'test_workdir_runs.py', 'test_fault_tolerance.py',
                     'test_main.py')


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(_SLOW_FILES_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # Stable: keeps the rest.

"""The machine line every benchmark and generated table prints: CPU model and cores, OS, Python,
jax and its devices. One function, so that every results file describes its machine alike."""
import os
import platform


def cpuinfo() -> dict:
    """What /proc/cpuinfo says: {'names': model name per logical core, 'mhz': clock per core,
    'flags': the ISA flags}; empty lists / set where there is no /proc/cpuinfo (macOS)."""
    names, mhz, isa = [], [], set()
    if os.path.exists('/proc/cpuinfo'):
        with open('/proc/cpuinfo') as f:
            for ln in f:
                key, _, val = ln.partition(':')
                key = key.strip()
                if key == 'model name':
                    names.append(val.strip())
                elif key == 'cpu MHz':
                    mhz.append(float(val))
                elif key == 'flags':
                    isa = set(val.split())
    return {'names': names, 'mhz': mhz, 'flags': isa}


def cpu() -> str:
    """The CPU model (``platform.processor()`` or the architecture without /proc/cpuinfo)."""
    names = cpuinfo()['names']
    return names[0] if names else (platform.processor() or platform.machine() or 'unknown CPU')


def machine() -> str:
    """CPU model, logical cores, OS and architecture, Python, jax, and the jax devices, e.g.
    'AMD EPYC 7B13, 2 logical cores, Linux x86_64, Python 3.11.7, jax 0.4.38, 1 x cpu device
    (cpu)'. Initialises jax's backends."""
    import jax
    dev = jax.devices()[0]
    return (f'{cpu()}, {os.cpu_count()} logical cores, {platform.system()} {platform.machine()}, '
            f'Python {platform.python_version()}, jax {jax.__version__}, '
            f'{jax.device_count()} x {dev.platform} device ({dev.device_kind})')

"""A pod run rehearsed on one machine: several training processes, the workdir on a local Cloud
Storage emulator, and the failures of a pod (preemption, a lost process, a failing bucket, a
half-written step, a restart on fewer hosts); `uniimage-rehearse` (cli/rehearse.py) plays them."""

"""Device families (host, arm_cpu, mobile_gpu, mcu): how to compile for them and how to run there.

Installed as ``lrdeploy.targets``. The devices themselves are data, not code paths.
"""

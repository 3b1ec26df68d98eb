"""DyCE core: segmented backbones, exits, MAC accounting, configurations, the exit rule,
the offline simulation and the run-time early-exit executor.

The core imports neither the service (FastAPI) nor the offline toolchain (training loops).
"""

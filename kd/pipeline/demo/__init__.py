"""The demo and what it is built from: synthetic driving scenes (``synth``), tiny models of each
VLM family (``tiny_models``, ``tiny_families``), ``kd demo`` itself (``run``, ``plans``) and its
report. Nothing in stage one or stage two imports it."""

from kd.pipeline.demo.plans import PLANS, DemoPlan
from kd.pipeline.demo.run import DemoResult, run_demo
from kd.pipeline.demo.students import worker_main

__all__ = ["PLANS", "DemoPlan", "DemoResult", "run_demo", "worker_main"]

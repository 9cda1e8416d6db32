# The worker job of the `nomad` worker driver, for people: read it, plan it, run it by hand
#   nomad job run -var agent=builtin nomad-jobs/autovibe-worker.nomad.hcl
# The driver sends the same job as JSON (autovibe-worker.json, rendered per agent kind);
# tests/workers/test_nomad_jobs.py checks that the two agree field by field.
#
# One parameterized batch job per agent kind; each assignment is one dispatch whose payload
# is the assignment's spec (JSON) and whose meta names trial, assignment and machine. The task
# runs the same runner as the local driver; it writes result.json into the shared data root.

variable "agent" {
  type        = string
  description = "Agent adapter this job runs (builtin, aider, ...)."
}

variable "python" {
  type        = string
  default     = "python3"
  description = "Interpreter on the clients that has autovibe installed."
}

variable "namespace" {
  type    = string
  default = "default"
}

variable "region" {
  type    = string
  default = "global"
}

variable "node_pool" {
  type    = string
  default = "default"
}

variable "datacenters" {
  type    = list(string)
  default = ["*"]
}

variable "cpu_mhz" {
  type    = number
  default = 1000
}

variable "memory_mb" {
  type    = number
  default = 4096
}

job "autovibe-worker" {
  id          = "autovibe-worker-${var.agent}"
  name        = "autovibe-worker-${var.agent}"
  type        = "batch"
  namespace   = var.namespace
  region      = var.region
  node_pool   = var.node_pool
  datacenters = var.datacenters

  meta {
    autovibe_agent = var.agent
  }

  parameterized {
    payload       = "required"
    meta_required = ["assignment", "trial", "machine"]
    meta_optional = []
  }

  group "worker" {
    count = 1

    # Retries belong to the orchestrator (it re-dispatches a lost assignment, at most
    # MAX_ATTEMPTS times): Nomad neither restarts nor reschedules a runner.
    restart {
      attempts = 0
      mode     = "fail"
    }

    reschedule {
      attempts  = 0
      unlimited = false
    }

    task "runner" {
      # raw_exec: the runner confines the agent itself (bubblewrap) and needs the shared data
      # root at the same path as the orchestrator.
      driver = "raw_exec"

      config {
        command = var.python
        args    = ["-m", "workers.runner", "${NOMAD_TASK_DIR}/spec.json"]
      }

      # Nomad writes the dispatch payload (the assignment spec) to local/spec.json.
      dispatch_payload {
        file = "spec.json"
      }

      env {
        PYTHONUNBUFFERED = "1"
      }

      # The runner kills the agent's process group on SIGTERM within 5 s, then exits.
      kill_timeout = "30s"

      resources {
        cpu    = var.cpu_mhz
        memory = var.memory_mb
      }

      logs {
        max_files     = 10
        max_file_size = 10
      }
    }
  }
}

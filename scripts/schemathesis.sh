#!/usr/bin/env bash
# shellcheck disable=SC2329 # stop_server, print_server_errors and cleanup run from the EXIT trap
# Schemathesis against a live server, with the server's own spec, over every operation.
#
# Starts `tunery-server start` on embedded PGlite in a temp data dir, seeds a few real objects
# through the API (base model, dataset, a completed job with outputs and a checkpoint, a running
# job, a pending job, a template, a trajectory, a distillation job), then runs schemathesis twice:
# the user operations with the admin key of tenant `default`, and the `workers` tag with a worker
# token. The seeded ids are offered to the generator as dictionaries, so GETs by id hit real
# objects too. Every check schemathesis has runs (`--checks all`): no 5xx, documented status codes,
# response bodies, content types and headers as the spec says, invalid data refused, valid data
# taken, undocumented methods answered 405 with `Allow`, auth not ignored, and so on. Each run draws
# a fresh random seed and prints it, so a failure replays with SCHEMATHESIS_SEED. Exits non-zero on
# any failure; the server is stopped on every exit path.
#
#   bash scripts/schemathesis.sh              # 2–4 minutes on 2 cores, a new seed each run
#   SCHEMATHESIS_SEED=1234 bash scripts/schemathesis.sh   # replay the run that printed seed 1234
#   SCHEMATHESIS_MAX_EXAMPLES=50 …            # more examples per operation
#   SCHEMATHESIS_KEEP=1 …                     # keep the temp dir (server log, config) for a look
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

max_examples="${SCHEMATHESIS_MAX_EXAMPLES:-12}"
worker_max_examples="${SCHEMATHESIS_WORKER_MAX_EXAMPLES:-25}"
# Hard wall-clock caps per run (seconds): a hung request fails instead of hanging CI. Every check
# (stateful links included) takes 20–150 s on an idle two-core machine and over twice that when it
# is shared; the caps leave room for that, so a busy machine is not a failure.
user_timeout="${SCHEMATHESIS_USER_TIMEOUT:-600}"
worker_timeout="${SCHEMATHESIS_WORKER_TIMEOUT:-300}"
# A fresh seed per run (printed at the start and the end): new inputs every time, and any failure replays.
seed="${SCHEMATHESIS_SEED:-$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}"
schemathesis="$root/.venv/bin/schemathesis"
spec="$root/openapi/openapi.yaml"

work="$(mktemp -d "${TMPDIR:-/tmp}/tunery-schemathesis.XXXXXX")"
data="$work/data"
server_pid=""

stop_server() {
  [[ -n $server_pid ]] || return 0
  if kill -0 "$server_pid" 2>/dev/null; then
    kill -TERM "$server_pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$server_pid" 2>/dev/null || true
  fi
  wait "$server_pid" 2>/dev/null || true
  server_pid=""
}

# The server logs at `error`, so its log holds exactly the 5xx it answered (with stacks).
print_server_errors() {
  [[ -s $work/server.log ]] || return 0
  echo "--- server errors (last 40 lines of $work/server.log) ---" >&2
  tail -n 40 "$work/server.log" | cut -c1-600 >&2
}

cleanup() {
  local status=$?
  if [[ -n ${serving_pid:-} ]]; then kill "$serving_pid" 2>/dev/null || true; fi
  stop_server
  if [[ $status -ne 0 ]]; then print_server_errors; fi
  if [[ -n ${SCHEMATHESIS_KEEP:-} ]]; then echo "kept $work" >&2; else rm -rf "$work"; fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# `node --import tsx` is one process (no tsx/pnpm wrapper): started with `&` below (not through a
# shell function, which would fork a subshell), $! is the server itself and stopping it is exact.
# The seeded catalog entry below names a directory under /nonexistent: the model root allows it.
export TUNERY_DATA_DIR="$data" LOG_LEVEL=error TUNERY_MODEL_ROOTS=/nonexistent
unset DATABASE_URL # embedded PGlite, whatever the caller's environment says
cli() { node --import tsx "$root/server/src/cli.ts" "$@"; }

started=$SECONDS
# Embedded PGlite is single-process: the worker token is made before the server opens the database.
worker_token="$(cli keys create --worker --name schemathesis | tail -n 1)"
port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
base="http://127.0.0.1:$port"
PORT="$port" HOST=127.0.0.1 node --import tsx "$root/server/src/cli.ts" start >"$work/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 240); do
  if curl -sf "$base/v1/health" >/dev/null 2>&1; then break; fi
  if ! kill -0 "$server_pid" 2>/dev/null; then
    echo "schemathesis.sh: the server exited during start-up" >&2
    exit 1
  fi
  sleep 0.25
done
curl -sf "$base/v1/health" >/dev/null || {
  echo "schemathesis.sh: the server did not answer /v1/health within 60 s" >&2
  exit 1
}
# The first start creates an admin key of tenant `default` and keeps it in the data dir.
user_key="$(tail -n 1 "$data/admin-key")"
echo "server up on $base in $((SECONDS - started)) s"

# ---------------------------------------------------------------- seed real objects
# call KEY METHOD PATH [JSON]: the response body; any non-2xx status fails the script.
call() {
  local key=$1 method=$2 path=$3 body=${4-}
  local args=(-sS --fail-with-body -X "$method" -H "Authorization: Bearer $key")
  if [[ -n $body ]]; then args+=(-H 'Content-Type: application/json' --data-binary "$body"); fi
  curl "${args[@]}" "$base$path"
}
user() { call "$user_key" "$@"; }
worker() { call "$worker_token" "$@"; }
upload() { # upload PATH LEASE_TOKEN CONTENT
  curl -sS --fail-with-body -X PUT -H "Authorization: Bearer $worker_token" -H "X-Lease-Token: $2" \
    -H 'Content-Type: application/octet-stream' --data-binary "$3" "$base$1" >/dev/null
}
claim() {
  worker POST /v1/workers/claim \
    '{"worker_id":"schemathesis-seed","capabilities":{"job_types":["finetune"],"methods":["lora"],"device":"cpu"},"wait_seconds":5}'
}

base_model_id="$(user POST /v1/base-models '{"name":"st-tiny","source":"/nonexistent/tiny-model","params":1000000,"architecture":"llama"}' | jq -r .id)"
dataset_id="$(user POST /v1/datasets '{"name":"st-data","train_texts":["hello world","the quick brown fox","tunery trains models"]}' | jq -r .id)"
job_body="{\"base_model\":\"st-tiny\",\"dataset_id\":\"$dataset_id\",\"method\":\"lora\",\"training_config\":{\"max_steps\":4,\"save_steps\":2}}"

# A completed job: claimed, reported on, a checkpoint and outputs uploaded, completed with an adapter and a model.
done_job="$(user POST /v1/training/jobs "$job_body" | jq -r .id)"
claimed="$(claim)"
[[ "$(jq -r .job.job_id <<<"$claimed")" == "$done_job" ]] || {
  echo "schemathesis.sh: seeding claimed an unexpected job: $claimed" >&2
  exit 1
}
lease="$(jq -r .job.lease_token <<<"$claimed")"
file_id="$(jq -r '.job.inputs[0].file_id' <<<"$claimed")"
now="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
worker POST "/v1/workers/jobs/$done_job/logs" \
  "{\"lease_token\":\"$lease\",\"lines\":[{\"seq\":1,\"ts\":\"$now\",\"text\":\"step 1\"},{\"seq\":2,\"ts\":\"$now\",\"text\":\"step 2\"}]}" >/dev/null
worker POST "/v1/workers/jobs/$done_job/metrics" \
  "{\"lease_token\":\"$lease\",\"points\":[{\"step\":1,\"ts\":\"$now\",\"phase\":\"train\",\"loss\":2.5,\"lr\":0.001},{\"step\":2,\"ts\":\"$now\",\"phase\":\"train\",\"loss\":2.1,\"lr\":0.001}]}" >/dev/null
worker POST "/v1/workers/jobs/$done_job/events" \
  "{\"lease_token\":\"$lease\",\"phase\":\"training\",\"progress\":{\"current_step\":2,\"total_steps\":4,\"current_loss\":2.1},\"events\":[{\"kind\":\"phase\",\"ts\":\"$now\",\"payload\":{\"phase\":\"training\"}}]}" >/dev/null
upload "/v1/workers/jobs/$done_job/checkpoints/checkpoint-2?step=2" "$lease" 'checkpoint bytes'
upload "/v1/workers/jobs/$done_job/outputs/adapter_model.safetensors" "$lease" 'adapter bytes'
upload "/v1/workers/jobs/$done_job/outputs/adapter_config.json" "$lease" '{"r":8}'
worker POST "/v1/workers/jobs/$done_job/complete" \
  "{\"lease_token\":\"$lease\",\"result\":{\"steps\":4,\"loss_final\":1.9,\"train_seconds\":1,\"gpu_seconds\":1,\"tokens_processed\":64,\"adapter\":{\"name\":\"st-adapter\",\"size_bytes\":13},\"model\":{\"name\":\"st-model\"}}}" >/dev/null
done_view="$(user GET "/v1/training/jobs/$done_job")"
model_id="$(jq -r .output_model_id <<<"$done_view")"
adapter_name="$(jq -r .adapter_name <<<"$done_view")"

# A running job whose lease token the worker run may use (so heartbeats, reports and uploads can succeed).
running_job="$(user POST /v1/training/jobs "$job_body" | jq -r .id)"
claimed="$(claim)"
running_lease="$(jq -r .job.lease_token <<<"$claimed")"
[[ "$(jq -r .job.job_id <<<"$claimed")" == "$running_job" ]] || {
  echo "schemathesis.sh: seeding claimed an unexpected job: $claimed" >&2
  exit 1
}
# A pending job (cancel, delete, claim), a template, a trajectory and a distillation job.
pending_job="$(user POST /v1/training/jobs "$job_body" | jq -r .id)"
user POST /v1/training/templates '{"name":"st-template","description":"seeded","config":{"method":"lora","training_config":{"max_steps":4}}}' >/dev/null
trajectory_id="$(user POST /v1/trajectories '{"source":"chat","llm_calls":[{"model":"m","user_prompt":"hi","response":"hello"}]}' | jq -r .id)"
distill_job="$(user POST /v1/distillation '{"name":"st-distill","config":{"teacher_model":"local/st-tiny","student_model":"st-tiny","prompts":["say hi"],"training_steps":2}}' | jq -r .id)"
# Stateful runs follow links from the key list to revoke: revoking the worker token would stop the
# serving worker below mid-run, so the hooks send a revoke of it to an id that does not exist.
export SCHEMATHESIS_PROTECTED_KEY_IDS
SCHEMATHESIS_PROTECTED_KEY_IDS="$(user GET '/v1/admin/keys?kind=worker' | jq -r '[.keys[].id] | join(",")')"
echo "seeded: jobs $done_job (completed) $running_job (running) $pending_job (pending) $distill_job (distillation)," \
  "dataset $dataset_id, model $model_id, adapter $adapter_name, trajectory $trajectory_id, base model $base_model_id," \
  "worker token $SCHEMATHESIS_PROTECTED_KEY_IDS (never revoked)"

# ---------------------------------------------------------------- schemathesis config
# Dictionaries of real values; each matching parameter takes one of them half of the time.
cat >"$work/schemathesis.toml" <<EOF
hooks = "$root/scripts/schemathesis_hooks.py"

[generation]
database = "none"

# Every check runs ("--checks all"). Schema-valid data may still be refused by rules no schema can
# state: an unknown model or dataset, "one of train_texts, records or jsonl", text with NUL (which
# Postgres cannot store), an integer past its column's range (400), a budget already spent (402).
# Those refusals are 4xx in the error shape; any other answer to valid data (5xx, 422, …) fails.
[checks.positive_data_acceptance]
expected-statuses = ["2xx", "3xx", "400", "401", "402", "403", "404", "409", "429"]
# Invalid data may be refused for its size before its shape is looked at: 413 is a refusal too.
[checks.negative_data_rejection]
expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429"]

[dictionaries.job_id]
values = ["$done_job", "$running_job", "$pending_job", "$distill_job"]
[dictionaries.dataset_id]
values = ["$dataset_id"]
[dictionaries.model_id]
values = ["$model_id"]
[dictionaries.trajectory_id]
values = ["$trajectory_id"]
[dictionaries.file_id]
values = ["$file_id"]
[dictionaries.adapter_name]
values = ["$adapter_name"]
[dictionaries.template_name]
values = ["st-template", "lora-default"]
[dictionaries.file]
values = ["adapter_model.safetensors", "adapter_config.json"]
[dictionaries.checkpoint_name]
values = ["checkpoint-2", "checkpoint-4"]
[dictionaries.lease_token]
values = ["$running_lease"]

[parameters]
"path.job_id" = { dictionary = "job_id", probability = 0.5 }
"path.fine_tuning_job_id" = { dictionary = "job_id", probability = 0.5 }
"path.dataset_id" = { dictionary = "dataset_id", probability = 0.5 }
"path.model_id" = { dictionary = "model_id", probability = 0.5 }
"path.trajectory_id" = { dictionary = "trajectory_id", probability = 0.5 }
"path.file_id" = { dictionary = "file_id", probability = 0.5 }
"path.adapter_name" = { dictionary = "adapter_name", probability = 0.5 }
"path.template_name" = { dictionary = "template_name", probability = 0.5 }
"path.file" = { dictionary = "file", probability = 0.5 }
"path.checkpoint_name" = { dictionary = "checkpoint_name", probability = 0.5 }
"header.X-Lease-Token" = { dictionary = "lease_token", probability = 0.5 }
"body.lease_token" = { dictionary = "lease_token", probability = 0.5 }
EOF

# ---------------------------------------------------------------- run
echo "schemathesis seed: $seed (replay with SCHEMATHESIS_SEED=$seed bash scripts/schemathesis.sh)"
run_schemathesis() { # run_schemathesis LABEL TIMEOUT ARGS...
  local label=$1 limit=$2
  shift 2
  local t0=$SECONDS rc=0
  echo
  echo "--- schemathesis: $label ---"
  # Run from the temp dir: schemathesis keeps its crash cache in the working directory.
  (cd "$work" && timeout --kill-after=10 "$limit" "$schemathesis" --config-file "$work/schemathesis.toml" run "$spec" \
    --url "$base" --checks all --request-timeout 30 --no-color --seed "$seed" "$@") || rc=$?
  if [[ $rc -eq 124 || $rc -eq 137 ]]; then echo "schemathesis ($label) ran past ${limit} s and was stopped" >&2; fi
  echo "--- schemathesis: $label: exit $rc in $((SECONDS - t0)) s ---"
  return "$rc"
}

# A serving worker for the user operations (chat completions, adapter load/unload): it answers
# every inference request at once with "ok", over the same protocol a real `--serve` worker speaks.
serve_requests() {
  # Nothing may end this loop but the kill at the end of the run: no `set -e` here.
  set +e
  local claimed id token
  while true; do
    claimed="$(curl -sS --max-time 30 -X POST -H "Authorization: Bearer $worker_token" \
      -H 'Content-Type: application/json' --data '{"worker_id":"schemathesis-serving","wait_seconds":5}' \
      "$base/v1/workers/inference/claim" 2>/dev/null)"
    id="$(jq -r '.request_id // empty' <<<"$claimed" 2>/dev/null)"
    token="$(jq -r '.request_token // empty' <<<"$claimed" 2>/dev/null)"
    if [[ -z $id || -z $token ]]; then sleep 0.1; continue; fi # 204 (nothing came) or an error
    curl -sS --max-time 30 -X POST -H "Authorization: Bearer $worker_token" -H 'Content-Type: application/json' \
      --data "{\"request_token\":\"$token\",\"worker_id\":\"schemathesis-serving\",\"text\":\"ok\",\"done\":true,\"finish_reason\":\"stop\",\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1}}" \
      "$base/v1/workers/inference/$id/report" >/dev/null 2>&1 || true
  done
}

status=0
run_schemathesis "worker protocol (tag workers, worker token)" "$worker_timeout" \
  -H "Authorization: Bearer $worker_token" --include-tag workers --max-examples "$worker_max_examples" || status=1
serve_requests &
serving_pid=$!
run_schemathesis "user operations (every tag but workers, user key)" "$user_timeout" \
  -H "Authorization: Bearer $user_key" --exclude-tag workers --max-examples "$max_examples" || status=1
kill "$serving_pid" 2>/dev/null || true
wait "$serving_pid" 2>/dev/null || true

if ! curl -sf "$base/v1/health" >/dev/null; then
  echo "schemathesis.sh: the server stopped answering /v1/health" >&2
  status=1
fi
echo
echo "schemathesis.sh: $([[ $status -eq 0 ]] && echo passed || echo FAILED) in $((SECONDS - started)) s (seed $seed)"
exit "$status"

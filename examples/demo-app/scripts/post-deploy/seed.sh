#!/usr/bin/env bash
# The guide's "Database seeding" example, with a text file standing in for the
# database so the demo needs nothing installed. Idempotent: re-running it (for
# example with `postdeploy run demo-app`) finds the data and skips the seed.
set -euo pipefail

echo "[POST-DEPLOY] Seeding database for ${POST_DEPLOY_APP} at ${COMMIT_SHA:0:7} (${POST_DEPLOY_TRIGGER} run)..."

# Outside the checkout, so the data survives checkouts of newer commits.
db="${TMPDIR:-/tmp}/postdeploy-demo-${SEED_FILE}"

if [ -s "$db" ] && grep -q "^commit ${COMMIT_SHA}$" "$db"; then
    echo "[POST-DEPLOY] Data exists for this commit, skipping seed"
else
    echo "[POST-DEPLOY] Database empty for this commit, seeding..."
    for table in users products orders; do
        sleep 1  # a real seed talks to a database; this keeps the demo's pace visible
        echo "[POST-DEPLOY]   seeded ${table}"
    done
    echo "commit ${COMMIT_SHA}" >> "$db"
fi

echo "[POST-DEPLOY] ✓ Seeding complete"

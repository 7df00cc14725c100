#!/usr/bin/env bash
# The guide's "Database seeding" example, with a folder of text files standing in
# for the database so the demo needs nothing installed. Idempotent: once the data
# exists, later deploys (and `postdeploy run demo-app`) skip the seed.
set -euo pipefail

echo "[POST-DEPLOY] Seeding database for ${POST_DEPLOY_APP} at ${COMMIT_SHA:0:7} (${POST_DEPLOY_TRIGGER} run)..."

# In the job's home, which postdeploy keeps between runs (the checkout itself is
# read-only to the job, and replaced at each commit).
db="${HOME}/.demo-db"
mkdir -p "$db"

sleep 1  # a real check asks the database; this keeps the demo's pace visible
if [ -s "$db/${SEED_TABLES_FILE}" ]; then
    echo "[POST-DEPLOY] Data exists, skipping seed"
else
    echo "[POST-DEPLOY] Database empty, seeding..."
    for table in users products orders; do
        sleep 1
        echo "$table" >> "$db/${SEED_TABLES_FILE}"
        echo "[POST-DEPLOY]   seeded ${table}"
    done
fi

echo "[POST-DEPLOY] ✓ Seeding complete"

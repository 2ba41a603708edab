#!/bin/sh
# Runs once, when the compose stack's PostgreSQL initialises its data directory (the image runs
# /docker-entrypoint-initdb.d/* as its superuser). It creates the schema owner that migrations
# run as: a login role that owns the `mf` database but is not a superuser, so the SECURITY
# DEFINER functions the migrations create run with an ordinary role's rights. CREATEROLE lets it
# apply docs/database-roles.sql (the worker role and mf_cross_org) as well.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
     -v owner_password="$OWNER_DB_PASSWORD" <<'SQL'
CREATE ROLE mf_owner LOGIN NOSUPERUSER NOBYPASSRLS CREATEROLE PASSWORD :'owner_password';
CREATE DATABASE mf OWNER mf_owner;
SQL

# Sourced by the launchers that start ranks through DeepSpeed's multi-node runners (deepspeed.sh,
# sample_fid.sh, mpi.sh LAUNCH=deepspeed). Two hazards of that path:
#
# 1. Secrets. The runner turns every line of its env file (~/.deepspeed_env and ./.deepspeed_env, or
#    DS_ENV_FILE) and every caller variable named PYTHON*, MLFLOW*, NCCL*, UCX*, MV2* into
#    `export NAME=VALUE`, prints that in its log (`cmd = ...`) and puts it on the pdsh / ssh / mpirun
#    command line, where `ps` shows it on every node. ds_warn_env_secrets names (never shows the
#    value of) each secret-looking variable on that path and points to the safe ways.
# 2. A remote shell. pdsh joins the command into one string that each node's login shell parses,
#    after expanding %h %u %n %% itself; DeepSpeed only wraps words holding a space in double
#    quotes. So `train.run_dir=runs/$(cmd)` would run cmd there and `&` would split the word.
#    pdsh_word quotes a word so that it arrives verbatim (tests/test_secrets.py checks it over a
#    real pdsh + sshd), and the launchers pass --force_multi with a hostfile, so the words always
#    take that path (a one-host hostfile would otherwise start locally, with no shell to unquote).

# Same names as etsdm_dist/redact.py is_secret_name (tests/test_secrets.py keeps the two in step).
_DS_SECRET_RE='SECRET|TOKEN|PASSW|PASSPHRASE|SIGNATURE|CREDENTIAL|API[_-]?KEY|PRIVATE[_-]?KEY|ACCESSKEY$|[_-]KEY$|^SIG$'
_DS_NOT_SECRET_RE='[_-](FILE|PATH|DIR|URL|URI|ENDPOINT|TYPE|EXPIRY|EXPIRES|EXPIRATION)$'
_DS_URL_CREDENTIALS_RE='[A-Za-z][A-Za-z0-9+.-]*://[^/?#[:space:]]*@'

ds_is_secret_name() {  # NAME: status 0 if NAME looks like it holds a secret itself
  local n=${1^^}
  [[ $n =~ $_DS_SECRET_RE ]] && ! [[ $n =~ $_DS_NOT_SECRET_RE ]]
}

# ds_env_files: the env files DeepSpeed's multi-node runner reads (it joins DS_ENV_FILE to ~ and to
# the current directory; an absolute DS_ENV_FILE makes both the same file).
ds_env_files() {
  local name=${DS_ENV_FILE:-.deepspeed_env} home=~
  if [[ $name == /* ]]; then
    if [[ -f $name ]]; then printf '%s\n' "$name"; fi
    return 0
  fi
  if [[ -f $home/$name ]]; then printf '%s\n' "$home/$name"; fi
  if [[ -f ./$name && ! ./$name -ef $home/$name ]]; then printf '%s\n' "$PWD/$name"; fi
  return 0
}

ds_warn_env_secrets() {  # PROG: warn on stderr about secrets DeepSpeed would export to the nodes
  local prog=$1 file line name prefix found=0
  while IFS= read -r file; do
    while IFS= read -r line || [[ -n $line ]]; do
      [[ $line == *=* ]] || continue
      name=${line%%=*}
      name=${name//[[:space:]]/}
      if ds_is_secret_name "$name"; then
        echo "$prog: warning: $file sets $name, which looks like a secret" >&2; found=1
      elif [[ ${line#*=} =~ $_DS_URL_CREDENTIALS_RE ]]; then
        echo "$prog: warning: $file sets $name to a URL with a user name or password" >&2; found=1
      fi
    done < "$file"
  done < <(ds_env_files)
  while IFS= read -r name; do
    [[ $name =~ ^(PYTHON|MLFLOW|NCCL|UCX|MV2) ]] || continue
    prefix=${BASH_REMATCH[1]}
    if ds_is_secret_name "$name"; then
      echo "$prog: warning: $name is set; DeepSpeed forwards every $prefix* variable to the nodes" >&2
      found=1
    fi
  done < <(compgen -e)
  if ((found)); then
    cat >&2 <<EOF
$prog: DeepSpeed's multi-node runner writes these as \`export NAME=VALUE\` into its log and onto the
  pdsh/ssh/mpirun command line (visible in ps on every node). Keep credentials out of it: on each node
  AWS_PROFILE=<name> with ~/.aws/credentials (mode 600), or an instance role / workload identity, or
  AWS_SHARED_CREDENTIALS_FILE=<a mode-600 file on a shared file system>; only the NAME of the profile or
  file goes into the env file. See "Credentials" in README.md.
EOF
  fi
}

pdsh_word() {  # WORD: print the word that pdsh plus the remote shell turn back into WORD
  local w=$1 sq="'"
  if [[ -n $w && $w =~ ^[A-Za-z0-9_@+=:,./-]+$ ]]; then
    printf '%s' "$w"
    return
  fi
  if [[ $w == *" "* ]]; then
    # DeepSpeed wraps it in double quotes and escapes `"`; inside those, \ $ ` stay special.
    w=${w//\\/\\\\}
    w=${w//\$/\\\$}
    w=${w//\`/\\\`}
  else
    w="'${w//$sq/$sq\\$sq$sq}'"
  fi
  printf '%s' "${w//%/%%}"
}

pdsh_words() {  # WORD...: set the array PDSH_WORDS to each WORD through pdsh_word
  PDSH_WORDS=()
  local w
  for w in "$@"; do PDSH_WORDS+=("$(pdsh_word "$w"; printf x)"); PDSH_WORDS[-1]=${PDSH_WORDS[-1]%x}; done
}

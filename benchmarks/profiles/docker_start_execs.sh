#!/bin/bash
# Root: strace attaches to dockerd and containerd (their pid files as scripts/engines.sh writes them).
# One start call per network (same create body otherwise), every process dockerd and
# containerd start meanwhile (strace --seccomp-bpf: only execve stops), times from the call.
set -eu
export DOCKER_HOST=${DOCKER_HOST:-unix:///run/dspy-test/docker.sock}
PY=${PYTHON:-python3}
IMAGE=${1:?usage: docker_start_execs.sh IMAGE (a Redis image, e.g. dspy-infra-test/redis:TAG)}
RAW=$(mktemp); NET=execs-$$; docker network create $NET >/dev/null
for net in bridge $NET; do
  alias=""; [ $net != bridge ] && alias="--network-alias redis"
  id=$(docker create --network $net $alias -p 127.0.0.1:0:6379 $IMAGE)
  strace -f --seccomp-bpf -ttt -e trace=execve -e signal=none -o $RAW \
    -p $(cat /run/dspy-test/dockerd.pid) -p $(pgrep -f "containerd --config /run/dspy-test") 2>/dev/null & SP=$!
  sleep 1
  T0=$(date +%s.%N); docker start $id >/dev/null; T1=$(date +%s.%N)
  sleep 0.5; kill $SP; wait $SP 2>/dev/null || true
  echo "== $( [ $net = bridge ] && echo 'default bridge' || echo 'user-defined network (alias redis)'): start call $(echo "($T1-$T0)*1000" | bc -l | cut -c1-6) ms (docker CLI; under strace)"
  grep 'execve(' $RAW | grep -v ENOENT | grep -v -- '--version' | $PY -c "
import re,sys
t0=float(sys.argv[1]); t1=float(sys.argv[2])
for line in sys.stdin:
    m=re.match(r'\d+\s+([\d.]+) execve\(\"[^\"]*\", \[(.*?)\]', line)
    if not m: continue
    t=float(m.group(1))
    if t<t0 or t>t1: continue
    argv=[a.strip().strip('\"') for a in m.group(2).split(', ')]
    print(f'{(t-t0)*1000:7.1f} ms  ' + ' '.join(argv)[:150])
" $T0 $T1
  docker rm -f $id >/dev/null
done
docker network rm $NET >/dev/null

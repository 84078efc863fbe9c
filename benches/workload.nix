# Builds a benchmark workload from a JSON spec written by benches/bench.py:
#   [ { "name": "w1-0001", "files": [ [ "/usr/bin/x", offset, size ], ... ], "deps": [ 0, 5 ] }, ... ]
# Each file is cut from a real binary or library on the machine (never zeros or random
# bytes, so it compresses like store content); `deps` are indices of earlier entries whose
# paths the output mentions, so Nix records them as references and the workload is a DAG.
{ spec, salt ? "" }:
let
  entries = builtins.fromJSON (builtins.readFile spec);
  build = done: i:
    let
      e = builtins.elemAt entries i;
      deps = map (d: builtins.elemAt done d) e.deps;
      cut = n: f: "tail -c +${toString ((builtins.elemAt f 1) + 1)} ${builtins.elemAt f 0} | head -c ${toString (builtins.elemAt f 2)} > $out/f${toString n}";
      files = builtins.genList (n: cut n (builtins.elemAt e.files n)) (builtins.length e.files);
      drv = derivation {
        name = e.name;
        system = builtins.currentSystem;
        builder = "/bin/sh";
        PATH = "/usr/bin:/bin";
        inherit salt;
        args = [ "-c" ''
          set -e
          mkdir $out
          ${builtins.concatStringsSep "\n" files}
          echo ${builtins.concatStringsSep " " (map toString deps)} > $out/refs
        '' ];
      };
    in done ++ [ drv ];
in
builtins.foldl' build [ ] (builtins.genList (i: i) (builtins.length entries))

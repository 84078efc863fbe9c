# services.cachepush-gc: collect garbage in a binary cache on a timer (docs/gc.md).
#
# A oneshot service started by a timer. It keeps pinned paths, paths pushed or written
# within keepDays, and paths read through a gateway with --record-access within
# keepReadDays, each with its closure; gc never breaks a closure and is safe while
# cachepush pushes run.
{ config, lib, pkgs, ... }:
let
  cfg = config.services.cachepush-gc;
  inherit (lib) mkOption mkEnableOption mkIf types;
in
{
  options.services.cachepush-gc = {
    enable = mkEnableOption "garbage collection of a cachepush binary cache on a timer";

    package = mkOption {
      type = types.package;
      default = pkgs.cachepush;
      description = "The cachepush package.";
    };

    cache = mkOption {
      type = types.str;
      example = "s3://nix-cache?endpoint=https://ACCOUNT_ID.r2.cloudflarestorage.com&region=auto";
      description = "The binary cache to collect garbage in.";
    };

    keepDays = mkOption {
      type = types.int;
      default = 30;
      description = "Keep paths written or pushed within this many days, with their closures (0: pins only).";
    };

    keepReadDays = mkOption {
      type = types.nullOr types.int;
      default = null;
      description = "Keep paths read through a gateway running with --record-access within this many days (default: keepDays).";
    };

    grace = mkOption {
      type = types.str;
      default = "6h";
      description = "How old an unreferenced NAR, listing, log or multipart upload must be before it goes.";
    };

    startAt = mkOption {
      type = types.str;
      default = "daily";
      description = "When to run (a systemd calendar expression).";
    };

    credentialsFile = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/run/secrets/cachepush-gc-aws-credentials";
      description = "AWS shared-credentials file whose key may list, read, write and delete in the bucket (a string outside the Nix store).";
    };

    extraArgs = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "--max-delete" "100000" ];
      description = "More arguments for `cachepush gc`.";
    };
  };

  config = mkIf cfg.enable {
    assertions = [{
      assertion = !(cfg.credentialsFile != null && lib.hasPrefix builtins.storeDir (toString cfg.credentialsFile));
      message = "services.cachepush-gc.credentialsFile is in the Nix store, which every local user can read: give the path of a file outside it as a string, e.g. \"/run/secrets/cachepush-gc-aws-credentials\".";
    }];

    systemd.services.cachepush-gc = {
      description = "cachepush: garbage collection of ${cfg.cache}";
      after = [ "network-online.target" ];
      wants = [ "network-online.target" ];
      inherit (cfg) startAt;
      environment = {
        AWS_EC2_METADATA_DISABLED = "true";
      } // lib.optionalAttrs (cfg.credentialsFile != null) {
        AWS_SHARED_CREDENTIALS_FILE = "%d/aws-credentials";
      };
      serviceConfig = {
        Type = "oneshot";
        ExecStart = lib.escapeShellArgs ([
          "${cfg.package}/bin/cachepush" "gc" cfg.cache
          "--keep-days" (toString cfg.keepDays)
          "--grace" cfg.grace
        ] ++ lib.optionals (cfg.keepReadDays != null) [ "--keep-read-days" (toString cfg.keepReadDays) ]
          ++ cfg.extraArgs);
        LoadCredential = lib.optional (cfg.credentialsFile != null) "aws-credentials:${cfg.credentialsFile}";
        DynamicUser = true;
        ProtectSystem = "strict";
        ProtectHome = true;
        PrivateTmp = true;
        NoNewPrivileges = true;
      };
    };
  };
}

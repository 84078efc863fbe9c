# services.cachepush-upload: publish what a builder builds, without slowing builds down.
#
# Nix runs the post-build hook synchronously after each build and fails the build if the
# hook fails; `cachepush post-build-hook` only appends the paths to a queue directory and
# always succeeds. A `cachepush watch-store --queue-only` service drains the queue; a queue
# file is removed only once its paths are published, so restarts lose nothing.
{ config, lib, pkgs, ... }:
let
  cfg = config.services.cachepush-upload;
  inherit (lib) mkOption mkEnableOption mkIf types;
  hook = pkgs.writeShellScript "cachepush-post-build-hook" ''
    exec ${cfg.package}/bin/cachepush post-build-hook --queue ${lib.escapeShellArg cfg.queueDir}
  '';
in
{
  options.services.cachepush-upload = {
    enable = mkEnableOption "uploading every locally built path with cachepush";

    package = mkOption {
      type = types.package;
      default = pkgs.cachepush;
      description = "The cachepush package.";
    };

    to = mkOption {
      type = types.str;
      example = "s3://nix-cache?endpoint=https://ACCOUNT_ID.r2.cloudflarestorage.com&region=auto";
      description = "The binary cache to publish to.";
    };

    queueDir = mkOption {
      type = types.str;
      default = "/var/lib/cachepush/queue";
      description = "Where the hook queues paths for the uploader.";
    };

    credentialsFile = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/run/secrets/cachepush-aws-credentials";
      description = "AWS shared-credentials file with write access to the bucket (a string outside the Nix store).";
    };

    signingKeyFile = mkOption {
      type = types.str;
      example = "/run/secrets/cache.sk";
      description = ''
        The cache's secret signing key: a string, not a path literal. A path literal
        (./cache.sk) is copied into the world-readable Nix store, and from there the
        uploader would publish it into the cache itself.
      '';
    };
  };

  config = mkIf cfg.enable {
    assertions = map (name: {
      assertion = !(cfg.${name} != null && lib.hasPrefix builtins.storeDir (toString cfg.${name}));
      message = "services.cachepush-upload.${name} is in the Nix store, which every local user can read (and which this service uploads): give the path of a file outside it as a string, e.g. \"/run/secrets/cache.sk\".";
    }) [ "credentialsFile" "signingKeyFile" ];

    nix.settings.post-build-hook = hook;

    systemd.services.cachepush-upload = {
      description = "cachepush: publish queued store paths";
      wantedBy = [ "multi-user.target" ];
      after = [ "network-online.target" "nix-daemon.service" ];
      wants = [ "network-online.target" ];
      environment = {
        CACHEPUSH_SIGNING_KEY_FILE = "%d/signing-key";
        AWS_EC2_METADATA_DISABLED = "true";
        # Through the daemon: the store database is read-only under ProtectSystem.
        NIX_REMOTE = "daemon";
      } // lib.optionalAttrs (cfg.credentialsFile != null) {
        AWS_SHARED_CREDENTIALS_FILE = "%d/aws-credentials";
      };
      path = [ config.nix.package ];
      serviceConfig = {
        ExecStart = lib.escapeShellArgs [
          "${cfg.package}/bin/cachepush" "watch-store" "--queue-only"
          "--to" cfg.to "--queue" cfg.queueDir
        ];
        LoadCredential = [ "signing-key:${cfg.signingKeyFile}" ]
          ++ lib.optional (cfg.credentialsFile != null) "aws-credentials:${cfg.credentialsFile}";
        # Root, like the hook that fills the queue; the store is read-only to it anyway.
        ProtectSystem = "strict";
        ReadWritePaths = [ cfg.queueDir ];
        ProtectHome = true;
        PrivateTmp = true;
        NoNewPrivileges = true;
        Restart = "always";
        RestartSec = 5;
        LimitNOFILE = 65536;
      };
    };

    systemd.tmpfiles.rules = [ "d ${cfg.queueDir} 0700 root root -" ];
  };
}

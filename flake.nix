{
  description = "cachepush: publish Nix closures to S3-compatible storage, and serve private buckets to Nix";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" "x86_64-darwin" "aarch64-darwin" ];
      forAll = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
      cargo = builtins.fromTOML (builtins.readFile ./Cargo.toml);
    in
    {
      packages = forAll (pkgs: {
        default = pkgs.rustPlatform.buildRustPackage {
          pname = "cachepush";
          version = cargo.package.version;
          src = ./.;
          cargoLock.lockFile = ./Cargo.lock;
          # aws-lc-sys (TLS) builds its C sources with cmake.
          nativeBuildInputs = [ pkgs.cmake pkgs.installShellFiles ];
          # The integration tests need S3 servers and a writable Nix store; the unit tests run.
          cargoTestFlags = [ "--lib" ];
          postInstall = ''
            installShellCompletion --cmd cachepush \
              --bash <($out/bin/cachepush completions bash) \
              --zsh <($out/bin/cachepush completions zsh) \
              --fish <($out/bin/cachepush completions fish)
            $out/bin/cachepush man --dir man
            installManPage man/*.1
          '';
          meta = {
            description = cargo.package.description;
            license = with pkgs.lib.licenses; [ mit asl20 ];
            mainProgram = "cachepush";
          };
        };
      });

      apps = forAll (pkgs: {
        default = {
          type = "app";
          program = "${self.packages.${pkgs.system}.default}/bin/cachepush";
        };
      });

      devShells = forAll (pkgs: {
        # The Rust toolchain and what scripts/test.sh needs (Ceph's radosgw is Linux-only).
        default = pkgs.mkShell {
          packages = with pkgs; [
            cargo rustc clippy rustfmt cmake
            nix curl openssl apacheHttpd python3
          ] ++ pkgs.lib.optionals pkgs.stdenv.isLinux [ pkgs.ceph ];
        };
      });

      overlays.default = final: prev: {
        cachepush = self.packages.${prev.system}.default;
      };

      nixosModules = {
        gateway = import ./nix/gateway-module.nix;
        post-build-hook = import ./nix/post-build-hook-module.nix;
        gc = import ./nix/gc-module.nix;
        default = { imports = [ ./nix/gateway-module.nix ./nix/post-build-hook-module.nix ./nix/gc-module.nix ]; };
      };
    };
}

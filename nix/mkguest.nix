# mkGuest: a guest description -> an mvm image directory
#
#   $out/<kernel>        the kernel image, named as nixpkgs builds it (kernel.target:
#                        bzImage on x86_64, Image on aarch64)
#   $out/initrd          busybox + the virtio/ext4 modules, made by src/mvm/images/initrd.py
#   $out/rootfs.ext4     the closure of `packages` (and of every store path the services
#                        name), the guest agent, a Python for it, /etc/mvm/guest.json
#   $out/manifest.json   what `mvmctl build --flake` imports into its image store
#
# The rootfs has the same layout as the Debian builder's (src/mvm/images/guestfiles.py):
# /usr/lib/mvm/init is PID 1, the agent is /usr/lib/mvm/mvm/guest, services run as `mvm`
# (uid 1000) unless they name a user. Package programs are linked into /usr/bin, busybox
# provides /bin (so `sh -c` works), and guest.json's `path` is the guest's PATH.
#
# Only nixpkgs attributes with stable, documented signatures are used: runCommand,
# writeText, closureInfo, python3, e2fsprogs, kmod, zstd, pkgsStatic.busybox,
# linuxPackages.kernel and buildPackages.
{
  pkgs,
  agentSrc,
  initrdScript,
}:
args:
let
  inherit (builtins)
    attrNames
    attrValues
    concatStringsSep
    elem
    filter
    foldl'
    genList
    length
    elemAt
    toJSON
    ;

  spec = import ./spec.nix args;

  getBin = p: p.bin or p;
  python = pkgs.python3;
  buildPython = pkgs.buildPackages.python3;
  busybox = pkgs.pkgsStatic.busybox;
  e2fsprogs = getBin pkgs.buildPackages.e2fsprogs;
  kmod = getBin pkgs.buildPackages.kmod;
  zstd = getBin pkgs.buildPackages.zstd;

  kernel = if spec.kernel != null then spec.kernel else pkgs.linuxPackages.kernel;
  kernelFile = kernel.target or "bzImage";
  kernelVersion = kernel.modDirVersion or kernel.version;
  # Newer nixpkgs puts the modules in a `modules` output; older ones keep them in `out`.
  modulesRoot = kernel.modules or kernel;

  # The same document GuestSpec.guest_json() writes for mvm.toml, plus the guest's PATH.
  guestDoc = {
    schema_version = 1;
    frontend = "nix";
    inherit (spec)
      name
      hostname
      cpus
      memory
      services
      healthChecks
      ;
    packages = map (p: p.name or (baseNameOf (toString p))) spec.packages;
    path = "/usr/bin:/bin";
  };
  guestText = toJSON guestDoc;
  guestJson = pkgs.writeText "mvm-${spec.name}-guest.json" guestText;

  # Accounts, as guestfiles.account_lines: `mvm` (1000) first, then each other service user.
  serviceUsers = foldl' (acc: u: if u == "root" || elem u acc then acc else acc ++ [ u ]) [ "mvm" ] (
    map (s: s.user) (attrValues spec.services)
  );
  users = genList (i: {
    name = elemAt serviceUsers i;
    uid = 1000 + i;
  }) (length serviceUsers);
  lines = xs: concatStringsSep "\n" xs + "\n";
  passwd = lines (
    [ "root:x:0:0:root:/root:/bin/sh" ]
    ++ map (u: "${u.name}:x:${toString u.uid}:${toString u.uid}:mvm service user:/home/${u.name}:/bin/sh") users
  );
  group = lines (
    [
      "root:x:0:"
      "tty:x:5:"
      "mvm:x:1000:${concatStringsSep "," (map (u: u.name) (filter (u: u.name != "mvm") users))}"
    ]
    ++ map (u: "${u.name}:x:${toString u.uid}:") (filter (u: u.name != "mvm") users)
  );
  shadow = lines (map (u: "${u.name}:!:19000:0:99999:7:::") ([ { name = "root"; } ] ++ users));

  # The guest agent (stdlib-only Python), byte-compiled: store files have mtime 1, so the
  # .pyc use unchecked hashes (an uncompiled agent boots seconds slower under TCG).
  agent = pkgs.runCommand "mvm-guest-agent" { } ''
    mkdir -p $out/lib/mvm/mvm/guest
    cp ${agentSrc}/*.py $out/lib/mvm/mvm/guest/
    : > $out/lib/mvm/mvm/__init__.py
    { printf '%s\n' '#!${python}/bin/python3 -IS'; cat ${agentSrc}/entry.py; } > $out/lib/mvm/init
    chmod 0755 $out/lib/mvm/init
    PYTHONDONTWRITEBYTECODE=1 ${python}/bin/python3 -m compileall -f -q --invalidation-mode unchecked-hash $out/lib/mvm/mvm >/dev/null
  '';

  closure = pkgs.closureInfo {
    rootPaths = [
      agent
      guestJson
      python
      busybox
    ]
    ++ spec.packages;
  };

  rootfs =
    pkgs.runCommand "mvm-${spec.name}-rootfs"
      {
        inherit passwd group shadow;
        passAsFile = [
          "passwd"
          "group"
          "shadow"
        ];
        packages = spec.packages;
        homes = map (u: u.name) users;
        uids = map (u: toString u.uid) users;
      }
      ''
        root=$PWD/root
        mkdir -p $root/bin $root/etc/mvm $root/usr/bin $root/usr/lib $root/nix/store \
          $root/proc $root/sys $root/dev $root/run $root/tmp $root/var/tmp $root/root $root/mnt
        chmod 1777 $root/tmp $root/var/tmp
        chmod 0700 $root/root

        echo "copying the closure ($(wc -l < ${closure}/store-paths) store paths)"
        while read -r path; do
          cp -a "$path" $root/nix/store/
        done < ${closure}/store-paths

        # /bin: busybox's applets (sh for `sh -c`, and tools for `mvmctl exec`)
        for f in ${busybox}/bin/*; do
          ln -s "$f" "$root/bin/''${f##*/}"
        done
        # /usr/bin: the packages' programs, first package wins
        for p in $packages; do
          for d in "$p/bin" "$p/sbin"; do
            [ -d "$d" ] || continue
            for f in "$d"/*; do
              n=''${f##*/}
              [ -e "$root/usr/bin/$n" ] || [ -L "$root/usr/bin/$n" ] || ln -s "$f" "$root/usr/bin/$n"
            done
          done
        done
        [ -e $root/usr/bin/env ] || ln -s /bin/env $root/usr/bin/env

        ln -s ${agent}/lib/mvm $root/usr/lib/mvm
        cp ${guestJson} $root/etc/mvm/guest.json
        cp "$passwdPath" $root/etc/passwd
        cp "$groupPath" $root/etc/group
        cp "$shadowPath" $root/etc/shadow
        chmod 0640 $root/etc/shadow
        printf 'passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n' > $root/etc/nsswitch.conf
        printf '127.0.0.1\tlocalhost\n::1\tlocalhost\n' > $root/etc/hosts
        for u in $homes; do
          mkdir -p $root/home/$u
          chmod 0750 $root/home/$u
        done

        # Everything belongs to root except the service users' homes. The builder may be an
        # unprivileged build user, so ownership is set in the image itself, with debugfs.
        find $root -exec touch -h -d @1 {} +
        inodes=$(find $root | wc -l)
        size=$(du -smx $root | cut -f1)
        size=$((size + size / 5 + 64))
        export E2FSPROGS_FAKE_TIME=1
        ${e2fsprogs}/bin/mkfs.ext4 -q -F -T default -O ^has_journal -L mvm-root \
          -U 44444444-4444-4444-8888-888888888888 -E root_owner=0:0,hash_seed=44444444-4444-4444-8888-888888888888 \
          -N $((inodes + inodes / 4 + 1024)) -d $root rootfs.ext4 "''${size}M"
        {
          (cd $root && find . -mindepth 1 -printf '%P\n') | while read -r f; do
            echo "sif \"/$f\" uid 0"
            echo "sif \"/$f\" gid 0"
          done
          set -- $uids
          for u in $homes; do
            echo "sif /home/$u uid $1"
            echo "sif /home/$u gid $1"
            shift
          done
        } > owners.debugfs
        ${e2fsprogs}/bin/debugfs -w -f owners.debugfs rootfs.ext4 >/dev/null
        ${e2fsprogs}/bin/e2fsck -fn rootfs.ext4 >/dev/null
        mkdir $out
        mv rootfs.ext4 $out/
      '';

  # The initrd loads the virtio and ext4 modules (nixpkgs builds them as modules) and
  # switches to the rootfs. A kernel without modules gets an initrd that only mounts.
  initrd = pkgs.runCommand "mvm-initrd-${kernelVersion}" { } ''
    mods=${modulesRoot}/lib/modules/${kernelVersion}
    if [ ! -e "$mods/modules.dep" ]; then
      mkdir -p lib/modules/${kernelVersion}
      if [ -d "$mods" ]; then
        cp -r "$mods/." lib/modules/${kernelVersion}/
        chmod -R u+w lib
      fi
      ${kmod}/bin/depmod -b $PWD ${kernelVersion}
      mods=$PWD/lib/modules/${kernelVersion}
    fi
    export PATH=${zstd}/bin:$PATH
    mkdir $out
    ${buildPython}/bin/python3 ${initrdScript} --modules "$mods" \
      --busybox ${busybox}/bin/busybox --out $out/initrd
  '';

  manifest = pkgs.writeText "mvm-${spec.name}-manifest.json" (toJSON {
    schema_version = 1;
    name = spec.name;
    frontend = "nix";
    kernel = kernelFile;
    kernel_version = kernelVersion;
    initrd = "initrd";
    rootfs = "rootfs.ext4";
    transports = [ "virtio-serial" ];
    guest = guestDoc;
    source = {
      builder = "mkGuest";
    };
  });

  image =
    pkgs.runCommand "mvm-${spec.name}"
      {
        passthru = {
          inherit
            rootfs
            initrd
            kernel
            agent
            guestJson
            closure
            ;
          guest = guestDoc;
        };
      }
      ''
        mkdir $out
        ln -s ${kernel}/${kernelFile} $out/${kernelFile}
        ln -s ${initrd}/initrd $out/initrd
        ln -s ${rootfs}/rootfs.ext4 $out/rootfs.ext4
        cp ${manifest} $out/manifest.json
      '';
in
# Validate everything before anything is built: a misspelled attribute fails evaluation.
builtins.seq guestText image
